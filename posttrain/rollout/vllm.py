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
Both return the same `Rollout` record as the transformers path through `rollout/engine.py`.

vllm is imported only when an engine is built, so the CPU path never needs it.

Not here: the transformers backend (`rollout/hf.py`), choosing a backend (`OnlineTrainer`), the HTTP server and
client (`rollout/server.py`, `rollout/client.py`).
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
        options = dict(model=model, enable_prefix_caching=True, **options)
        self.llm = vllm.LLM(**{k: v for k, v in options.items() if v is not None})

    def sample(self, prompt_ids: list[list[int]], counts: list[int], max_tokens: int,
               options: dict[str, Any]) -> list[list[int]]:
        """`counts[i]` completions of prompt i (`SamplingParams(n=counts[i])`: one prefill per prompt), in order."""
        params = [self._vllm.SamplingParams(n=n, max_tokens=max_tokens, **options) for n in counts]
        if len(set(counts)) == 1:
            params = params[0]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(c.token_ids) for out in outputs for c in out.outputs]

    def load_weights(self, weights: Weights) -> None:
        if hasattr(self.llm, "apply_model"):  # vLLM ≥ 0.9: run a function on the model in every worker
            self.llm.apply_model(lambda model: model.load_weights(weights))
            return
        engine = self.llm.llm_engine  # older engines expose the in-process worker
        engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights


class VLLMColocate(EngineBackend):
    """A vLLM engine in this process. `generate(policy, tokenizer, prompt_ids, G, max_new_tokens, kwargs, step)`."""

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, dtype: str = "auto", multi_process: bool = False):
        options = dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                       dtype=dtype, tensor_parallel_size=1)
        if multi_process:
            options["distributed_executor_backend"] = "external_launcher"
        self.engine = VLLMEngine(model_path, **options)

    def sample(self, prompt_ids, counts, max_tokens, options):
        return self.engine.sample(prompt_ids, counts, max_tokens, options)

    def push_weights(self, policy: torch.nn.Module) -> None:
        with policy_weights(policy) as weights:
            self.engine.load_weights(weights)
        self.engine.reset_prefix_cache()
