"""Real sharding engines on CPU processes (gloo), 2 processes against 1 with the same global batch.

`accelerate launch` with the shipped zero3 / fsdp2 configs (`--mixed_precision no`: fp32 on CPUs) runs
tests/distributed_run.py for SFT, DPO (reference model) and GRPO (beta > 0: the reference goes through
`prepare_frozen`), 3 steps each, beside one plain process. Checked per method: the engine really sharded (DeepSpeed
ZeRO-3 partitions or FSDP2 DTensors, in the trained and the reference model); the per-step losses agree to 1e-5
(measured: <= 9.6e-7 under ZeRO-3 and FSDP2); the saved model reloads and its weights agree to 2e-4 (measured:
<= 5.4e-5 after 3 AdamW steps at lr 1e-3). The LM head runs in 8-row chunks, so processes holding different numbers
of trained tokens make different numbers of chunks (ZeRO-3 gathers the head on every call: they must be evened out),
and after GRPO process 0 ends its rows at the first token while the other decodes 8 (the decode loop must keep both
stepping). ZeRO-2 (optimizer state and gradients sharded, weights not) is `slow`. ZeRO tests skip without DeepSpeed
(`pip install deepspeed`, the `deepspeed` extra; no compiled ops are needed, the optimizer is torch's AdamW, but
DeepSpeed JIT-compiles its shared-memory comm op on a machine's first CPU run: ~90 s once, cached).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from test_distributed import free_port

from posttrain.launch import resolve_config

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed_run.py")
METHODS = ("sft", "dpo", "grpo")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs DeepSpeed (pip install deepspeed)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", POSTTRAIN_TEST_HEAD_ROWS="8", POSTTRAIN_TEST_SAVE="1")
    return env


def _launch(config: str, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             resolve_config(config), "--main_process_port", str(free_port()), "--num_processes", "2",
                             "--mixed_precision", "no", SCRIPT, str(out), *METHODS],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, out) -> dict:
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log[-3000:]
    runs = {m: json.loads((out / f"{m}.json").read_text()) for m in METHODS}
    runs["decode"] = [json.loads((out / f"decode-{rank}.json").read_text()) for rank in (0, 1)]
    return runs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    process = subprocess.Popen([sys.executable, SCRIPT, str(out), *METHODS], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return out, process


def _baseline(one_process) -> tuple:
    out, process = one_process
    if process.returncode is None:
        log = process.communicate(timeout=300)[0]
        assert process.returncode == 0, log[-3000:]
    return out, {m: json.loads((out / f"{m}.json").read_text()) for m in METHODS}


@pytest.fixture(scope="module")
def zero3(one_process, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, _finish(_launch("zero3", out), out)  # runs while the one-process baseline does


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, _finish(_launch("fsdp2", out), out)


def _compare(one_process, sharded, method: str, engine: dict) -> None:
    base_dir, base = _baseline(one_process)
    out, runs = sharded
    run = runs[method]
    assert run["world_size"] == 2 and base[method]["world_size"] == 1
    assert {k: run["engine"][k] for k in engine} == engine, run["engine"]
    if method != "sft":  # DPO's and GRPO's reference is sharded like the policy (prepare_frozen)
        assert run["engine"]["ref_sharded"] is engine["policy_sharded"], run["engine"]
    one, two = base[method]["losses"], run["losses"]
    diff = max(abs(a - b) for a, b in zip(one, two))
    print(f"{method}: 1 process {one}, 2 processes {two}, max |diff| {diff:.2e}")
    assert len(one) == len(two) == 3 and diff < 1e-5

    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / f"{method}-model")
    reference = AutoModelForCausalLM.from_pretrained(base_dir / f"{method}-model")
    weights = dict(reference.named_parameters())
    dw = max((p - weights[name]).abs().max().item() for name, p in saved.named_parameters())
    print(f"{method}: saved weights max |diff| {dw:.2e}")
    assert dw < 2e-4
    if method == "grpo":  # process 0 ended at once, process 1 decoded all 8 tokens: the loop kept both stepping
        assert [r["lengths"] for r in runs["decode"]] == [[1] * 4, [8] * 4]


@needs_deepspeed
@pytest.mark.parametrize("method", METHODS)
def test_zero3_two_processes_match_one(one_process, zero3, method):
    _compare(one_process, zero3, method, {"type": "DEEPSPEED", "zero_stage": 3, "policy_wrapper": "DeepSpeedEngine",
                                          "policy_sharded": True})


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_two_processes_match_one(one_process, fsdp2, method):
    _compare(one_process, fsdp2, method, {"type": "FSDP", "policy_sharded": True})


@pytest.mark.slow
@needs_deepspeed
def test_zero2_two_processes_match_one(one_process, tmp_path):
    """ZeRO-2 shards optimizer state and gradients, not weights; its frozen reference is a plain (stage 0) engine."""
    runs = _finish(_launch("zero2", tmp_path), tmp_path)
    for method in METHODS:
        _compare(one_process, (tmp_path, runs), method, {"type": "DEEPSPEED", "zero_stage": 2,
                                                         "policy_wrapper": "DeepSpeedEngine",
                                                         "policy_sharded": False})
        if method != "sft":
            assert runs[method]["engine"]["ref_wrapper"] == "DeepSpeedEngine"


def test_fsdp_on_cpu_is_left_alone_without_an_fsdp_launch(monkeypatch):
    import types

    from accelerate.utils import DistributedType

    from posttrain.models import sharding

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    assert not sharding.fsdp_on_cpu(accelerator)
    assert not sharding.collective_forwards(torch.nn.Linear(2, 2))  # one process: never collective
