"""Optional vLLM generation backend for online trainers (GPU; `pip install 'posttrain[vllm]'`).

`VLLMEngine` is a `vllm.LLM` that takes token ids and returns token ids; it is what both vLLM modes run:
- colocate (`VLLMColocate`): an engine inside each training process, sharing its GPU (`vllm_gpu_memory_utilization`
  of the memory; the rest stays with training). Before a rollout it pushes the policy's current weights into the
  engine when they changed since the last push (once per optimizer step), then samples every prompt's G
  completions in one `generate` call (`SamplingParams(n=G)`, so vLLM prefills each prompt once). With several
  processes, each runs its own engine on its own device (`distributed_executor_backend="external_launcher"`),
  tensor parallel size 1.
- server: `posttrain vllm-serve --backend vllm` runs one on separate GPUs behind HTTP (`rollout/server.py`), and the
  trainer talks to it through `rollout/client.py`.
Both return the same `Rollout` record as the transformers path through `rollout/engine.py`, with the log-probability
vLLM sampled each token with (`SamplingParams(logprobs=0)`: the sampled token's log-prob; the engine is built with
`logprobs_mode="processed_logprobs"` where vLLM has it, so they are after temperature and top-k/top-p, as the
trainer's) for GRPO's importance-sampling correction.
`vllm_structured_outputs_regex` becomes vLLM's structured-outputs (older: guided-decoding) regex;
`vllm_enable_sleep_mode` puts the colocated engine to sleep (weights offloaded, cache freed) after each rollout.

vllm is imported only when an engine is built, so the CPU path never needs it.

Not here: the transformers backend (`rollout/hf.py`), choosing a backend (`OnlineTrainer`), the HTTP server.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from posttrain.rollout.engine import EngineBackend, Weights, policy_weights


def _import_vllm():
    # `apply_model` sends a function (holding the weights) to the engine's worker processes; vLLM ≥ 0.9 refuses to
    # serialise a function for its own workers unless this is set. Set before the import: vLLM may read it then.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("use_vllm=True needs the vllm package: pip install 'posttrain[vllm]' (CUDA GPU).") from e
    return vllm


class VLLMEngine:
    """A `vllm.LLM` engine with prefix caching: `sample` token ids, `load_weights`, `reset_prefix_cache`."""

    def __init__(self, model: str, **options: Any):
        vllm = _import_vllm()
        self._vllm = vllm
        options = {k: v for k, v in dict(model=model, enable_prefix_caching=True, **options).items() if v is not None}
        try:  # log-probs after temperature and filtering, as the trainer computes them (vLLM ≥ 0.10.2)
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **options)
        except TypeError:  # an older vLLM: raw log-probs (the correction then also covers the temperature)
            self.llm = vllm.LLM(**options)

    def sample(self, prompt_ids: list[list[int]], counts: list[int], max_tokens: int,
               options: dict[str, Any]) -> tuple[list[list[int]], list[list[float | None]] | None]:
        """`counts[i]` completions of prompt i (`SamplingParams(n=counts[i])`: one prefill per prompt), in order,
        and the log-prob each token was sampled with (None when the engine returned none)."""
        options = dict(options)
        regex = options.pop("structured_outputs_regex", None)
        if regex is not None:
            options.update(self._structured_outputs(regex))
        params = [self._vllm.SamplingParams(n=n, max_tokens=max_tokens, logprobs=0, **options) for n in counts]
        if len(set(counts)) == 1:
            params = params[0]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        completions = [c for out in outputs for c in out.outputs]
        sequences = [list(c.token_ids) for c in completions]
        if any(getattr(c, "logprobs", None) is None for c in completions):
            return sequences, None
        return sequences, [sampled_logprobs(c.token_ids, c.logprobs) for c in completions]

    def _structured_outputs(self, regex: str) -> dict[str, Any]:
        """SamplingParams keywords constraining a completion to `regex` (vLLM ≥ 0.10.2 names it structured outputs,
        earlier versions guided decoding)."""
        params = self._vllm.sampling_params
        if hasattr(params, "StructuredOutputsParams"):
            return {"structured_outputs": params.StructuredOutputsParams(regex=regex)}
        return {"guided_decoding": params.GuidedDecodingParams(regex=regex)}

    def sleep(self) -> None:
        self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed

    def wake_up(self) -> None:
        self.llm.wake_up()

    def load_weights(self, weights: Weights) -> None:
        if hasattr(self.llm, "apply_model"):  # vLLM ≥ 0.9: run a function on the model in every worker
            self.llm.apply_model(lambda model: model.load_weights(weights))
            return
        engine = self.llm.llm_engine  # older engines expose the in-process worker
        engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights


def sampled_logprobs(token_ids, logprobs) -> list[float | None]:
    """vLLM's per-position log-prob dicts ({token id: Logprob}, the sampled token always among them) → the sampled
    token's log-prob at each position (None where it is missing)."""
    out = []
    for token, position in zip(token_ids, logprobs):
        entry = position.get(token) if position is not None else None
        out.append(None if entry is None else float(getattr(entry, "logprob", entry)))
    return out


class VLLMColocate(EngineBackend):
    """A vLLM engine in this process. `generate(policy, tokenizer, prompt_ids, G, max_new_tokens, kwargs, step)`."""

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, dtype: str = "auto", multi_process: bool = False, tensor_parallel_size: int = 1,
                 model_impl: str = "vllm", enable_sleep_mode: bool = False, structured_outputs_regex=None):
        options = dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                       dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        if model_impl != "vllm":
            options["model_impl"] = model_impl
        if enable_sleep_mode:
            options["enable_sleep_mode"] = True
        if multi_process:
            options["distributed_executor_backend"] = "external_launcher"
        self.sleep_mode = enable_sleep_mode
        self.structured_outputs_regex = structured_outputs_regex
        self.engine = VLLMEngine(model_path, **options)

    def generate(self, *args, **kwargs):
        """`EngineBackend.generate`, waking a sleeping engine first and putting it back to sleep after."""
        if not self.sleep_mode:
            return super().generate(*args, **kwargs)
        self.engine.wake_up()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.engine.sleep()

    def sample(self, prompt_ids, counts, max_tokens, options):
        return self.engine.sample(prompt_ids, counts, max_tokens, options)

    def push_weights(self, policy: torch.nn.Module) -> None:
        with policy_weights(policy) as weights:
            self.engine.load_weights(weights)
        self.engine.reset_prefix_cache()
