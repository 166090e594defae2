"""`posttrain vllm-serve`: a generation server for online trainers in server mode, on GPUs of its own.

    posttrain vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct --port 8000              # vLLM engine (default)
    posttrain vllm-serve --model posttrain/tiny --backend transformers --port 8000   # no vLLM: CPU-capable, slower

The trainer runs with `use_vllm=True, vllm_mode="server"` (and `vllm_server_base_url` or host/port) and talks to it
through `rollout/client.py`. Standard library HTTP (`http.server.ThreadingHTTPServer`), JSON bodies except weights:
- `GET /health` → {status, model, backend}
- `POST /generate` {prompt_ids: [[int]], n: [int] (completions per prompt), max_tokens, **sampling options as
  `rollout.engine.sampling_options` writes them (temperature 0 = greedy)} → {completion_ids: [[int]]}: each
  prompt's n completions consecutive, each ending at its EOS (kept) or after max_tokens.
- `POST /update_weights` body = `safetensors.torch.save({name: tensor})` (a subset of the model's parameters, named
  as in the transformers checkpoint) → loaded into the engine, then the prefix cache is reset → {loaded: count}.
- `POST /reset_prefix_cache` → {}.
Errors are {error: one line}, status 400 for a bad request, 500 for a failure in the engine. Requests are served one
at a time (one lock around the engine): several trainer processes may call at once, each with its own prompts.
There is no authentication: anyone who reaches the port may replace the weights, so serve on a trusted network.

Weights travel over HTTP, not NCCL: it works between any two machines and is testable on a CPU, at a cost. Every
optimizer step the trainer's main process sends the policy's full parameters in their training dtype (tied
weights once): 2 bytes per parameter in bf16, 4 in float32 — 3.1 GB per sync for a 1.5B-parameter bf16 policy,
about 2.5 s on a 10 Gb/s link before serialisation and loading — in chunks (≤ 1 GiB by default) so each side holds
one chunk's copy at a time; the vLLM backend hands each chunk to its workers through vLLM's own IPC (one more copy).
NCCL between the training and generation GPUs would move the same bytes at device bandwidth; it is not implemented.

Not here: the client (`rollout/client.py`), the vLLM engine (`rollout/vllm.py`), the generation loop of the
transformers backend (`rollout/hf.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import torch

from posttrain.errors import UserError
from posttrain.rollout.engine import Weights, as_samples

logger = logging.getLogger(__name__)
BACKENDS = ("vllm", "transformers")


class ServeError(UserError):
    """A bad option or an unusable backend for `posttrain vllm-serve` (printed as one line)."""


class TransformersEngine:
    """The server's engine without vLLM: a transformers model sampled by `rollout.hf.generate` (one shared prefill
    per prompt). Runs on the GPU when there is one, else on the CPU; the prefix cache is a no-op."""

    def __init__(self, model: str, dtype: str | None = "auto", device: str | None = None):
        from posttrain.models import loading

        # "auto" keeps posttrain's default (float32), the dtype a trainer loads the same model in
        self.model = loading.load_pretrained_model(model, **({} if dtype in (None, "auto") else {"dtype": dtype}))
        self.tokenizer = loading.prepare_tokenizer(loading.load_tokenizer(model))
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    def sample(self, prompt_ids: list[list[int]], counts: list[int], max_tokens: int,
               options: dict[str, Any]) -> list[list[int]]:
        from posttrain.rollout.hf import generate

        per_prompt = counts[0] if len(set(counts)) == 1 else counts
        rollout = generate(self.model, self.tokenizer, prompt_ids, per_prompt, max_tokens,
                           generation_kwargs_from_options(options))
        return [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]

    def load_weights(self, weights: Weights) -> None:
        """Copy the tensors into the model's parameters (all names and shapes are checked before any is copied)."""
        params = self.model.state_dict()  # views of the parameters: copying into them updates the model
        for name, tensor in weights:
            if name not in params:
                raise UserError(f"the served model has no parameter {name!r}: is the server running the "
                                "trainer's model?")
            if params[name].shape != tensor.shape:
                raise UserError(f"{name}: {tuple(tensor.shape)} sent, {tuple(params[name].shape)} served: is the "
                                "server running the trainer's model?")
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def reset_prefix_cache(self) -> None:
        pass  # no cache outlives a request


def generation_kwargs_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """vLLM sampling options (the wire format) → the transformers-style options `rollout.hf.generate` takes."""
    options = dict(options)
    temperature = float(options.pop("temperature", 1.0))
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    top_p, top_k = options.pop("top_p", 1.0), options.pop("top_k", -1)
    min_p, penalty = options.pop("min_p", 0.0), options.pop("repetition_penalty", 1.0)
    if options:
        raise UserError(f"the transformers backend does not take {', '.join(sorted(options))}; serve with "
                        "--backend vllm or leave them out of generation_kwargs")
    if temperature > 0:  # vLLM's 'off' values: top_k -1, min_p 0
        kwargs.update(temperature=temperature, top_p=top_p, top_k=max(int(top_k), 0), repetition_penalty=penalty)
        if min_p:
            kwargs["min_p"] = min_p
    return kwargs


def build_engine(model: str, backend: str = "vllm", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0):
    """The engine behind the server: `sample`, `load_weights`, `reset_prefix_cache`."""
    if backend == "transformers":
        return TransformersEngine(model, dtype)
    if backend != "vllm":
        raise ServeError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from posttrain.models.loading import resolve_model_path
    from posttrain.rollout.vllm import VLLMEngine

    try:
        return VLLMEngine(resolve_model_path(model), tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, max_model_len=max_model_len,
                          seed=seed)
    except ImportError as e:
        raise ServeError("--backend vllm needs the vllm package: pip install 'posttrain[vllm]' (CUDA GPU), or "
                         "serve with --backend transformers (no vLLM, slower)") from e


class GenerationServer(ThreadingHTTPServer):
    """The HTTP server around one engine. `serve_forever()` blocks; `start()` serves from a daemon thread."""

    daemon_threads = True

    def __init__(self, engine, host: str = "0.0.0.0", port: int = 8000, info: dict[str, Any] | None = None):
        super().__init__((host, port), _Handler)
        self.engine, self.info, self.lock = engine, dict(info or {}), threading.Lock()

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look up the host's FQDN: slow without DNS
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> GenerationServer:
        threading.Thread(target=self.serve_forever, name="posttrain-generation-server", daemon=True).start()
        return self

    # ---- endpoints: request body → JSON-able reply; ValueError = bad request --------------------------------
    def health(self, body: bytes) -> dict[str, Any]:
        return {"status": "ok", **self.info}

    def generate(self, body: bytes) -> dict[str, Any]:
        prompt_ids, counts, max_tokens, options = parse_generate_request(body)
        with self.lock:
            sequences, logprobs = as_samples(self.engine.sample(prompt_ids, counts, max_tokens, options))
        reply = {"completion_ids": sequences}
        if logprobs is not None:  # the sampled tokens' log-probs (vLLM backend), for importance sampling
            reply["logprobs"] = logprobs
        return reply

    def update_weights(self, body: bytes) -> dict[str, Any]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            weights = list(load(body).items())
        except SafetensorError as e:
            raise UserError(f"the body is not a safetensors file: {e}") from e
        with self.lock:
            self.engine.load_weights(weights)
            self.engine.reset_prefix_cache()
        return {"loaded": len(weights)}

    def reset_prefix_cache(self, body: bytes) -> dict[str, Any]:
        with self.lock:
            self.engine.reset_prefix_cache()
        return {}


def parse_generate_request(body: bytes) -> tuple[list[list[int]], list[int], int, dict[str, Any]]:
    """(prompt_ids, counts, max_tokens, sampling options) of a /generate body; ValueError names what is wrong."""
    try:
        request = json.loads(body or b"{}")
    except json.JSONDecodeError as e:
        raise UserError(f"the body is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise UserError("the body must be a JSON object")
    prompt_ids = request.pop("prompt_ids", None)
    if (not isinstance(prompt_ids, list) or not prompt_ids
            or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt_ids)):
        raise UserError("prompt_ids must be a non-empty list of non-empty lists of token ids")
    counts = request.pop("n", 1)
    counts = [counts] * len(prompt_ids) if isinstance(counts, int) else counts
    if not isinstance(counts, list) or len(counts) != len(prompt_ids) or not all(
            isinstance(n, int) and n >= 1 for n in counts):
        raise UserError("n must be a count >= 1 or one per prompt")
    max_tokens = request.pop("max_tokens", None)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return prompt_ids, counts, max_tokens, request


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    ROUTES: ClassVar[dict[tuple[str, str], str]] = {
        ("GET", "/health"): "health", ("POST", "/generate"): "generate",
        ("POST", "/update_weights"): "update_weights", ("POST", "/reset_prefix_cache"): "reset_prefix_cache"}

    def do_GET(self) -> None:  # and do_POST: the server's method named in ROUTES
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        name = self.ROUTES.get((self.command, self.path.split("?")[0]))
        if name is None:
            self._reply(404, {"error": f"no endpoint {self.command} {self.path}"})
            return
        try:
            self._reply(200, getattr(self.server, name)(body))
        except (ValueError, TypeError) as e:  # a bad request (SamplingParams raises TypeError on unknown options)
            self._reply(400, {"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})
        except Exception as e:  # the engine failed: answer, keep serving, log the traceback
            logger.exception("%s %s failed", self.command, self.path)
            self._reply(500, {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"})

    do_POST = do_GET

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # one debug line per request, not stderr
        logger.debug("%s " + format, self.address_string(), *args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain vllm-serve", allow_abbrev=False,
                                description="Serve generation for online trainers run with use_vllm=True, "
                                            "vllm_mode='server'.")
    p.add_argument("--model", required=True, help="the policy's starting model: Hub id, local directory or "
                                                  "built-in name (the trainer sends its weights every step)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="vllm", choices=BACKENDS,
                   help="vllm (GPU, default) or transformers (no vLLM; CPU-capable, slower)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm backend only")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm backend only")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's dtype (vllm), float32 (transformers)")
    p.add_argument("--max_model_len", type=int, default=None, help="vllm backend only (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.error = _error  # one line, not argparse's usage + exit
    return p


def _error(message: str) -> None:
    raise ServeError(f"{message} (see posttrain vllm-serve --help)")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")
    torch.manual_seed(args.seed)
    engine = build_engine(args.model, args.backend, args.tensor_parallel_size, args.gpu_memory_utilization,
                          args.dtype, args.max_model_len, args.seed)
    server = GenerationServer(engine, args.host, args.port, {"model": args.model, "backend": args.backend})
    print(f"posttrain vllm-serve: {args.model} ({args.backend} backend) listening on {server.url}; train with "
          f"use_vllm=True, vllm_mode='server', vllm_server_base_url='http://<this host>:{server.server_address[1]}'",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("posttrain vllm-serve: stopped", flush=True)
    finally:
        server.server_close()
