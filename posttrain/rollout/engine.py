"""What the token-in, token-out generation backends share: the vLLM engine in this process (`rollout/vllm.py`) and
the client of a generation server (`rollout/client.py`).

`EngineBackend.generate` has the signature of `rollout.hf.generate` plus the optimizer step: it pushes the policy's
weights to the engine once per step (PEFT adapters merged first, names as vLLM and transformers load them), asks the
engine for each prompt's completions as token lists, and turns those into the same `Rollout` as the transformers
path — EOS masking and left padding are `rollout/hf.py`'s. `sampling_options` translates transformers-style
generation options into vLLM's `SamplingParams` keywords, which are also the generation server's wire format.

An engine may also return the log-probability it sampled each token with (vLLM: `SamplingParams(logprobs=0)`); the
`Rollout` then carries them as `sampler_logps`, which GRPO's importance-sampling correction compares with the
trainer's own log-probs of the same tokens (`losses.policy.sampler_importance_weights`).

`vllm_backend` picks the one a trainer's config asks for.

Not here: any engine (vLLM, the server, its transformers backend) or any import of vllm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.rollout.hf import _eos_ids, left_pad, rollout_after_eos
from posttrain.rollout.types import Rollout

Weights = list[tuple[str, torch.Tensor]]
Samples = list[list[int]] | tuple[list[list[int]], list[list[float | None]] | None]


def vllm_backend(args, accelerator, model_name: str):
    """colocate: a vLLM engine in this process (vllm is imported there and nowhere else); server: a client of
    `posttrain vllm-serve`, whose main process sends the weights (the trainer needs no vllm then)."""
    if args.vllm_mode == "server":
        from posttrain.rollout.client import VLLMServerClient

        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        client = VLLMServerClient(url, args.vllm_server_timeout, accelerator.is_main_process,
                                  accelerator.wait_for_everyone, model_name)
        client.structured_outputs_regex = args.vllm_structured_outputs_regex
        return client
    from posttrain.rollout.vllm import VLLMColocate

    return VLLMColocate(model_name, args.vllm_gpu_memory_utilization, args.vllm_max_model_length, args.seed,
                        multi_process=args.world_size > 1, tensor_parallel_size=args.vllm_tensor_parallel_size,
                        model_impl=args.vllm_model_impl, enable_sleep_mode=args.vllm_enable_sleep_mode,
                        structured_outputs_regex=args.vllm_structured_outputs_regex)


def sampling_options(generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers-style sampling options → `vllm.SamplingParams` keywords (vLLM's 'off' values where unset)."""
    if generation_kwargs.get("num_beams", 1) > 1:
        raise UserError(f"generation_kwargs num_beams={generation_kwargs['num_beams']}: vLLM's sampling has no beam "
                        "search; remove num_beams, or generate with transformers (use_vllm=False).")
    if not generation_kwargs.get("do_sample", True):
        return {"temperature": 0.0}
    options = {"temperature": generation_kwargs.get("temperature", 1.0),
               "top_p": generation_kwargs.get("top_p", 1.0),
               "top_k": generation_kwargs.get("top_k") or -1,
               "min_p": generation_kwargs.get("min_p") or 0.0,
               "repetition_penalty": generation_kwargs.get("repetition_penalty", 1.0)}
    # any other option passes as it is, e.g. generation_kwargs={"stop": [...]}
    options.update({k: v for k, v in generation_kwargs.items() if k not in options and k != "do_sample"})
    return options


@contextlib.contextmanager
def policy_weights(policy: torch.nn.Module) -> Iterator[Weights]:
    """The policy's (name, tensor) pairs as the engine's model names them, adapters merged in for the duration."""
    merged = hasattr(policy, "merge_adapter")
    if merged:
        policy.merge_adapter()
    try:
        yield [(engine_name(name), tensor.detach()) for name, tensor in policy.state_dict().items()
               if "lora_" not in name and "modules_to_save" not in name]
    finally:
        if merged:
            policy.unmerge_adapter()


def engine_name(name: str) -> str:
    """A state-dict key as the plain model (vLLM's or transformers') expects it: PEFT's wrapper prefixes removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def rollout_from_token_lists(sequences: list[list[int]], prompt_ids: list[list[int]], counts: list[int],
                             tokenizer, policy: torch.nn.Module,
                             logprobs: list[list[float | None]] | None = None) -> Rollout:
    """A `Rollout` from completions given as token lists (Σ counts of them, each prompt's consecutive).

    An engine stops a completion at its EOS (kept as its last token) or at max_tokens, so lists differ in length:
    they are right-padded, and the mask covers each list up to its first EOS (the tokenizer's or the policy's
    generation config's, as in `rollout/hf.py`). `logprobs` (one list per completion, aligned with its tokens; None
    where the engine gave none) becomes `sampler_logps` (N, C), NaN off the lists. On the policy's device."""
    pad_id, device = tokenizer.pad_token_id, next(policy.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_id)
    repeats = torch.tensor(counts)
    rollout = rollout_after_eos(ids.repeat_interleave(repeats, 0).to(device),
                                mask.repeat_interleave(repeats, 0).to(device), sequences,
                                _eos_ids(policy, tokenizer), pad_id)
    if logprobs is not None:
        width = rollout.completion_ids.shape[1]
        sampler_logps = torch.full((len(sequences), width), float("nan"), dtype=torch.float32)
        for i, values in enumerate(logprobs):
            row = [math.nan if v is None else float(v) for v in values[:width]]
            sampler_logps[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        rollout.sampler_logps = sampler_logps.to(device)
    return rollout


class EngineBackend:
    """A generation engine outside transformers' `generate`. Subclasses implement `sample` (token lists) and
    `push_weights` (policy → engine); `generate` and the once-per-step weight sync are shared."""

    _synced_step: int | None = None
    structured_outputs_regex: str | None = None  # vllm_structured_outputs_regex: every completion matches it

    def sample(self, prompt_ids: list[list[int]], counts: list[int], max_tokens: int,
               options: dict[str, Any]) -> Samples:
        """Σ counts completions (token lists, EOS kept), each prompt's `counts[i]` consecutive; or a pair (those
        lists, the sampled tokens' log-probs aligned with them, or None)."""
        raise NotImplementedError

    def push_weights(self, policy: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine and drop cached prefixes computed with the old ones."""
        raise NotImplementedError

    def generate(self, policy, tokenizer, prompt_ids: list[list[int]], num_generations: int | list[int],
                 max_new_tokens: int, generation_kwargs: dict[str, Any], step: int = 0) -> Rollout:
        """Like `rollout.hf.generate`: G completions per prompt (or one count per prompt), groups consecutive."""
        if self._synced_step != step:  # once per optimizer step: rollouts of the same step share the weights
            self.push_weights(policy)
            self._synced_step = step
        counts = [num_generations] * len(prompt_ids) if isinstance(num_generations, int) else list(num_generations)
        options = sampling_options(generation_kwargs)
        if self.structured_outputs_regex is not None:
            options["structured_outputs_regex"] = self.structured_outputs_regex
        sequences, logprobs = as_samples(self.sample(prompt_ids, counts, max_new_tokens, options))
        if len(sequences) != sum(counts):
            raise RuntimeError(f"the generation engine returned {len(sequences)} completions for {sum(counts)} "
                               "requested")
        return rollout_from_token_lists(sequences, prompt_ids, counts, tokenizer, policy, logprobs)


def as_samples(result) -> tuple[list[list[int]], list[list[float | None]] | None]:
    """An engine's `sample` result as (token lists, log-prob lists or None)."""
    if isinstance(result, tuple):
        return result[0], result[1]
    return result, None
