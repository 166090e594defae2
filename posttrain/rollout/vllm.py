"""Optional vLLM generation backend for online trainers (GPU; `pip install 'posttrain[vllm]'`).

`VLLMColocate` runs a `vllm.LLM` engine inside each training process, sharing its GPU (`vllm_gpu_memory_utilization`
of the memory; the rest stays with training). Before a rollout it pushes the policy's current weights into the
engine when they changed since the last push (once per optimizer step), then samples every prompt's G completions
in one `generate` call (`SamplingParams(n=G)`, so vLLM prefills each prompt once) and returns the same `Rollout`
record as the transformers path (`rollout/hf.py`): EOS masking and padding are shared.

vllm is imported only when this backend is built, so the CPU path never needs it. With several processes, each
runs its own engine on its own device (`distributed_executor_backend="external_launcher"`), tensor parallel size 1.

Not here: the transformers backend (`rollout/hf.py`), choosing a backend (`OnlineTrainer.sample`). The server mode
(generation on separate GPUs behind HTTP, weights sent over NCCL) is not implemented: `vllm_mode="server"` is
refused with a clear message.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.rollout.hf import completion_mask_after_eos, left_pad
from posttrain.rollout.types import Rollout


def _import_vllm():
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("use_vllm=True needs the vllm package: pip install 'posttrain[vllm]' (CUDA GPU).") from e
    return vllm


def sampling_options(generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers-style sampling options → `vllm.SamplingParams` keywords (vLLM's 'off' values where unset)."""
    if not generation_kwargs.get("do_sample", True):
        return {"temperature": 0.0}
    options = {"temperature": generation_kwargs.get("temperature", 1.0),
               "top_p": generation_kwargs.get("top_p", 1.0),
               "top_k": generation_kwargs.get("top_k") or -1,
               "min_p": generation_kwargs.get("min_p") or 0.0,
               "repetition_penalty": generation_kwargs.get("repetition_penalty", 1.0)}
    unknown = set(generation_kwargs) - {"do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    options.update({k: generation_kwargs[k] for k in unknown})  # e.g. generation_kwargs={"stop": [...]}
    return options


class VLLMColocate:
    """A vLLM engine in this process. `generate(policy, tokenizer, prompt_ids, G, max_new_tokens, kwargs, step)`."""

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, dtype: str = "auto", multi_process: bool = False):
        vllm = _import_vllm()
        self._vllm = vllm
        options = dict(model=model_path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       seed=seed, dtype=dtype, tensor_parallel_size=1, enable_prefix_caching=True)
        if multi_process:
            options["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**{k: v for k, v in options.items() if v is not None})
        self._synced_step: int | None = None

    def sync_weights(self, policy: torch.nn.Module, step: int) -> None:
        """Push the policy's weights into the engine once per optimizer step (adapters merged first)."""
        if self._synced_step == step:
            return
        model = policy
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = [(_vllm_name(name), tensor.detach()) for name, tensor in model.state_dict().items()
                       if "lora_" not in name and "modules_to_save" not in name]
            self._load_weights(weights)
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._synced_step = step

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if hasattr(self.llm, "apply_model"):  # vLLM ≥ 0.9: run a function on the model in every worker
            self.llm.apply_model(lambda model: model.load_weights(weights))
            return
        engine = self.llm.llm_engine  # older engines expose the in-process worker
        engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def generate(self, policy, tokenizer, prompt_ids: list[list[int]], num_generations: int | list[int],
                 max_new_tokens: int, generation_kwargs: dict[str, Any], step: int = 0) -> Rollout:
        """Like `rollout.hf.generate`: G completions per prompt (or one count per prompt), groups consecutive."""
        self.sync_weights(policy, step)
        counts = [num_generations] * len(prompt_ids) if isinstance(num_generations, int) else list(num_generations)
        options = sampling_options(generation_kwargs)
        params = [self._vllm.SamplingParams(n=n, max_tokens=max_new_tokens, **options) for n in counts]
        if len(set(counts)) == 1:
            params = params[0]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        sequences = [list(c.token_ids) for out in outputs for c in out.outputs]
        pad_id = tokenizer.pad_token_id
        width = max(max((len(s) for s in sequences), default=1), 1)
        completion_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        for i, seq in enumerate(sequences):
            completion_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        eos = tokenizer.eos_token_id
        completion_mask, truncated = completion_mask_after_eos(completion_ids, set(eos if isinstance(eos, list)
                                                                                   else [eos]))
        lengths = torch.tensor([len(s) for s in sequences])
        completion_mask &= (torch.arange(width)[None, :] < lengths[:, None]).long()  # vLLM stops at EOS: no padding
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
        ids, mask = left_pad(prompt_ids, pad_id)
        device = next(policy.parameters()).device
        repeats = torch.tensor(counts)
        return Rollout(prompt_ids=ids.repeat_interleave(repeats, 0).to(device),
                       prompt_mask=mask.repeat_interleave(repeats, 0).to(device),
                       completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
                       is_truncated=truncated.to(device))


def _vllm_name(name: str) -> str:
    """A state-dict key as vLLM's model expects it: PEFT's wrapper prefixes removed."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")
