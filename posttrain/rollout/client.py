"""`VLLMServerClient`: an online trainer's rollouts from a `posttrain vllm-serve` server (`vllm_mode="server"`), an
`EngineBackend` (`rollout/engine.py`) as the colocated engine is. Once per optimizer step the main process sends the
policy's weights as safetensors chunks to `/update_weights`; every process then waits at a barrier, so that no
process samples from the old weights, and asks `/generate` for its own prompts' completions. The wire format and the
cost of sending weights over HTTP: `rollout/server.py`. Standard library only (urllib); proxies set in the
environment are bypassed: the server is on the training cluster's own network.

Not here: the server (`rollout/server.py`), choosing the backend (`OnlineTrainer`). ZeRO-3/FSDP-sharded policies
are refused with a clear error (each process holds only a shard of the weights to send).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.rollout.engine import EngineBackend, Weights, policy_weights

logger = logging.getLogger(__name__)


class ServerUnreachableError(UserError, ConnectionError):
    """No generation server answered at the configured address (one line: the URL and how to start one)."""


class VLLMServerClient(EngineBackend):
    """Talks to a generation server; waits up to `timeout` seconds for it to come up (`/health`).

    `is_main_process`: this process sends the weights; `barrier`: called by every process after each sync (e.g.
    `accelerator.wait_for_everyone`); `chunk_bytes`: most weight bytes per `/update_weights` request."""

    def __init__(self, base_url: str, timeout: float = 240.0, is_main_process: bool = True,
                 barrier: Callable[[], None] | None = None, model_name: str | None = None,
                 chunk_bytes: int = 1 << 30):
        self.base_url = base_url.rstrip("/")
        self.is_main_process, self.barrier, self.chunk_bytes = is_main_process, barrier, chunk_bytes
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.last_sync: dict[str, float] = {}  # bytes and seconds of this process's last weight push
        self.info = self._wait_until_up(timeout, model_name)
        logger.info("generation server at %s: %s", self.base_url, self.info)

    # ---- EngineBackend ----------------------------------------------------------------------------------------
    def sample(self, prompt_ids: list[list[int]], counts: list[int], max_tokens: int,
               options: dict[str, Any]) -> tuple[list[list[int]], list[list[float | None]] | None]:
        request = {"prompt_ids": [[int(t) for t in ids] for ids in prompt_ids], "n": [int(n) for n in counts],
                   "max_tokens": int(max_tokens), **options}
        reply = self._post("/generate", json.dumps(request).encode())
        return reply["completion_ids"], reply.get("logprobs")  # log-probs: a vLLM-backed server only

    def push_weights(self, policy: torch.nn.Module) -> None:
        from posttrain.models.sharding import collective_forwards

        if collective_forwards(policy):
            raise UserError("vllm_mode='server' cannot send ZeRO-3/FSDP-sharded weights (each process holds a "
                            "shard); train with DDP or ZeRO-1/2, or use vllm_mode='colocate'.")
        if self.is_main_process:
            from safetensors.torch import save

            start, sent = time.perf_counter(), 0
            with policy_weights(policy) as weights:
                for chunk in weight_chunks(weights, self.chunk_bytes):
                    body = save(chunk)
                    self._post("/update_weights", body, "application/octet-stream")
                    sent += len(body)
            self.last_sync = {"bytes": sent, "seconds": time.perf_counter() - start}
            logger.debug("sent %.1f MB of weights to %s in %.2f s", sent / 1e6, self.base_url,
                         self.last_sync["seconds"])
        if self.barrier is not None:
            self.barrier()  # no process may sample before the server holds the new weights

    def reset_prefix_cache(self) -> None:
        self._post("/reset_prefix_cache", b"{}")

    # ---- HTTP -------------------------------------------------------------------------------------------------
    def _wait_until_up(self, timeout: float, model_name: str | None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request("GET", "/health", timeout=max(min(5.0, deadline - time.monotonic()), 0.5))
            except OSError as e:
                if time.monotonic() >= deadline:
                    port = urllib.parse.urlsplit(self.base_url).port or 8000
                    raise ServerUnreachableError(
                        f"no generation server answered at {self.base_url} within vllm_server_timeout={timeout:g}s "
                        f"({_reason(e)}); start one with `posttrain vllm-serve --model {model_name or 'MODEL'} "
                        f"--port {port}` (on GPUs the trainer does not use), or point vllm_server_base_url (or "
                        "vllm_server_host/vllm_server_port) at a running one") from e
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def _post(self, path: str, body: bytes, content_type: str = "application/json") -> dict[str, Any]:
        try:
            return self._request("POST", path, body, content_type)
        except OSError as e:
            raise ServerUnreachableError(f"the generation server at {self.base_url} stopped answering "
                                         f"({_reason(e)}); is `posttrain vllm-serve` still running?") from e

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float | None = None) -> dict[str, Any]:
        """The JSON reply; a 4xx answer raises ValueError, a 5xx RuntimeError (the server's one-line message);
        no answer raises OSError."""
        headers = {"Content-Type": content_type} if body is not None else {}
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except (ValueError, AttributeError):
                message = e.reason
            error = ValueError if 400 <= e.code < 500 else RuntimeError
            raise error(f"generation server {method} {path} ({e.code}): {message}") from None


def weight_chunks(weights: Weights, limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """CPU tensors grouped into dicts of at most `limit` bytes (a larger tensor goes alone). A tensor that is the
    same view of the same memory as an earlier one (tied embeddings) is left out: the receiving model ties it again;
    other tensors sharing memory are copied (safetensors refuses shared memory)."""
    seen: dict[tuple[Any, int], list[tuple]] = {}
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in weights:
        views = seen.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), [])
        view = (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if view in views:
            continue
        shared = bool(views)
        views.append(view)
        tensor = tensor.detach().to("cpu").contiguous()
        if shared:
            tensor = tensor.clone()
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > limit:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = tensor
        size += nbytes
    if chunk:
        yield chunk


def _reason(error: OSError) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__
