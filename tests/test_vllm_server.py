"""Server mode (`posttrain vllm-serve` + `VLLMServerClient`) on the CPU: the server runs in this process on a free
port with its transformers backend on the built-in tiny model. Checked: /health, /generate counts and shapes, bad
requests answered with one line, weight sync (after /update_weights the server's greedy completions are the
policy's own), a short GRPO run in server mode, and the one-line errors for an unreachable server and for the vllm
backend without vllm. vLLM itself is not run (it needs a CUDA GPU)."""

import json
import math
import socket
import sys
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.builtin import builtin_model_path
from posttrain.rollout import hf
from posttrain.rollout.client import ServerUnreachableError, VLLMServerClient, weight_chunks
from posttrain.rollout.engine import sampling_options
from posttrain.rollout.server import GenerationServer, ServeError, build_engine

MODEL = "posttrain/tiny"


@pytest.fixture(scope="module")
def server():
    engine = build_engine(MODEL, backend="transformers")
    srv = GenerationServer(engine, "127.0.0.1", 0, {"model": MODEL, "backend": "transformers"}).start()
    yield srv
    srv.shutdown()
    srv.server_close()




def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_generate_counts(server):
    client = VLLMServerClient(server.url, timeout=5)
    assert client.info == {"status": "ok", "model": MODEL, "backend": "transformers"}
    options = sampling_options({"do_sample": True, "temperature": 1.0, "top_k": 0})
    sequences, logprobs = client.sample([[5, 6, 7], [8]], [3, 1], 5, options)
    assert logprobs is None  # the transformers backend samples with the trainer's own arithmetic: nothing to correct
    assert len(sequences) == 4 and all(1 <= len(s) <= 5 for s in sequences)
    status, reply = _post(server.url + "/generate", {"prompt_ids": [[5], [6, 7]], "n": 2, "max_tokens": 3})
    assert status == 200 and len(reply["completion_ids"]) == 4
    assert _post(server.url + "/reset_prefix_cache", {}) == (200, {})


@pytest.mark.parametrize("body, needle", [
    ({"prompt_ids": [[5]], "n": [1, 2], "max_tokens": 3}, "n must be a count >= 1 or one per prompt"),
    ({"prompt_ids": [], "max_tokens": 3}, "prompt_ids must be a non-empty list"),
    ({"prompt_ids": [[5]], "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"prompt_ids": [[5]], "max_tokens": 3, "stop": ["\n"]}, "the transformers backend does not take stop"),
])
def test_bad_requests_get_one_line(server, body, needle):
    status, reply = _post(server.url + "/generate", body)
    assert status == 400 and needle in reply["error"] and "\n" not in reply["error"]
    client = VLLMServerClient(server.url, timeout=5)
    with pytest.raises(ValueError, match="generation server POST /generate \\(400\\)"):
        client._post("/generate", json.dumps(body).encode())
    assert _post(server.url + "/nowhere", {})[0] == 404


def test_weight_sync_makes_server_greedy_equal_policy_greedy(server):
    policy = AutoModelForCausalLM.from_pretrained(builtin_model_path(MODEL)).eval()
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    client = VLLMServerClient(server.url, timeout=5)
    prompts = [tok("What is 2 + 3?").input_ids, tok("7 - 4 =").input_ids]
    greedy = {"do_sample": False}

    def same(a, b):
        return all(torch.equal(getattr(a, k), getattr(b, k)) for k in
                   ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated"))

    before = client.generate(policy, tok, prompts, 1, 12, greedy, step=0)
    assert same(before, hf.generate(policy, tok, prompts, 1, 12, greedy))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * p.std().clamp(min=0.02))
    own = hf.generate(policy, tok, prompts, 1, 12, greedy)
    assert not same(own, before)  # the change is visible in greedy completions
    assert same(client.generate(policy, tok, prompts, 1, 12, greedy, step=0), before)  # same step: no push
    after = client.generate(policy, tok, prompts, 1, 12, greedy, step=1)
    assert same(after, own)
    # the bytes of one sync: every float32 parameter once (the tied LM head is not sent twice), plus headers
    unique = {p.data_ptr(): p.numel() for p in policy.parameters()}
    assert 4 * sum(unique.values()) <= client.last_sync["bytes"] < 4 * sum(unique.values()) * 1.01


def test_weight_chunks_leave_out_tied_weights_and_respect_the_limit():
    shared = torch.ones(4, 4)
    base = torch.zeros(10)
    weights = [("embed", shared), ("a", torch.ones(100)), ("b", base[:5]), ("c", base[5:]), ("head", shared)]
    chunks = list(weight_chunks(weights, limit=64 * 4))
    assert [list(c) for c in chunks] == [["embed"], ["a"], ["b", "c"]]  # 64 | 100 (alone) | 5 + 5 floats
    from safetensors.torch import save

    assert all(save(c) for c in chunks)  # "b" and "c" share memory: "c" was copied, so safetensors takes both


def test_grpo_trains_in_server_mode(server, monkeypatch, tmp_path):
    """use_vllm=True, vllm_mode='server' without vllm installed: rollouts come from the server, which is sent the
    policy's weights once per optimizer step."""
    from posttrain.configs.grpo import GRPOConfig
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.trainers.grpo import GRPOTrainer

    loads = []
    load_weights = server.engine.load_weights
    monkeypatch.setattr(server.engine, "load_weights", lambda weights: loads.append(len(weights))
                        or load_weights(weights))
    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url,
                      vllm_server_timeout=5, num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=6, max_steps=2, learning_rate=1e-3, report_to="none",
                      save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = GRPOTrainer(MODEL, reward_funcs=lambda completion_ids, **kw: [float(len(c)) for c in completion_ids],
                          args=args, train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    assert isinstance(trainer.vllm, VLLMServerClient)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert len(loads) == 2  # one push per optimizer step, all weights in one chunk
    assert logs[0]["completions/mean_length"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_clear_line(capsys, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ServerUnreachableError) as info:
        VLLMServerClient(url, timeout=0.3, model_name=MODEL)
    message = str(info.value)
    assert "\n" not in message and url in message and "vllm_server_timeout=0.3s" in message
    assert f"posttrain vllm-serve --model {MODEL} --port {port}" in message
    from posttrain.cli import main

    assert main(["grpo", "--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-prompts",
                 "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", str(port),
                 "--vllm_server_host", "127.0.0.1", "--vllm_server_timeout", "0.3", "--num_generations", "2",
                 "--reward_funcs", "accuracy_reward", "--report_to", "none", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("posttrain grpo: error: no generation server answered at http://127.0.0.1:")


def test_vllm_backend_without_vllm_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # restored afterwards
    with pytest.raises(ServeError, match=r"pip install 'posttrain\[vllm\]'.*--backend transformers"):
        build_engine(MODEL, backend="vllm")
    from posttrain.cli import main

    assert main(["vllm-serve", "--model", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend transformers" in err


def test_cli_serves_until_stopped():
    """`posttrain vllm-serve` as a user starts it: a process that answers /health and /generate."""
    import os
    import subprocess

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "vllm-serve", "--model", MODEL, "--backend",
                                "transformers", "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = VLLMServerClient(f"http://127.0.0.1:{port}", timeout=120)
        assert client.info["backend"] == "transformers"
        assert len(client.sample([[5, 6]], [2], 3, {"temperature": 0.0})[0]) == 2
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"listening on http://127.0.0.1:{port}" in output
