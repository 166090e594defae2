"""Two processes (gloo on CPU, started by torchrun) train like one process with the same global batch.

One 1-process and one 2-process run of tests/distributed_run.py (SFT, DPO, GRPO, RLOO, and GRPO-bnpo with 2
accumulation steps per process: 2 × 2 against 1 × 1; 3 steps each); the per-step losses must agree to 1e-5. GRPO/RLOO use greedy rollouts cut to a length set by each row's place in its group, so
the rollouts are the same in both layouts while groups span processes (see distributed_run.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sft", "dpo", "grpo", "rloo", "grpo_bnpo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {n: tmp_path_factory.mktemp(f"world{n}") for n in (1, 2)}
    script = os.path.join(HERE, "distributed_run.py")
    one = subprocess.Popen([sys.executable, script, str(out[1]), *METHODS], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), script, str(out[2]), *METHODS],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    log_one = one.communicate(timeout=300)[0]
    assert one.returncode == 0, log_one[-3000:]
    assert two.returncode == 0, two.stdout[-3000:]
    return {n: {m: json.loads((out[n] / f"{m}.json").read_text()) for m in METHODS} for n in (1, 2)}


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(runs, method):
    one, two = runs[1][method], runs[2][method]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 3
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    print(f"{method}: 1 process {one['losses']}, 2 processes {two['losses']}, max |diff| {diff:.2e}")
    assert diff < 1e-5
    if method in ("sft", "dpo", "grpo"):  # the losses move, so the check covers updated weights too
        assert abs(one["losses"][0] - one["losses"][-1]) > 1e-3


def test_group_runs_split_groups_across_processes():
    from posttrain.trainers.distributed import group_runs

    assert group_runs(0, 8, 4) == [4, 4]
    assert group_runs(2, 6, 4) == [2, 4]
    assert group_runs(6, 6, 4) == [2, 4]
    assert group_runs(1, 2, 4) == [2]


def test_uneven_counts_generate_in_order():
    import torch

    from posttrain.models.loading import load_pretrained_model, load_tokenizer
    from posttrain.rollout.hf import generate

    model, tok = load_pretrained_model("posttrain/tiny"), load_tokenizer("posttrain/tiny")
    prompts = [tok("1 + 2 =")["input_ids"], tok("30 - 4 is")["input_ids"]]
    uneven = generate(model, tok, prompts, [1, 3], 4, {"do_sample": False})
    even = generate(model, tok, prompts, 3, 4, {"do_sample": False})
    assert uneven.completion_ids.shape[0] == 4
    assert torch.equal(uneven.completion_ids[0], even.completion_ids[0])
    assert torch.equal(uneven.completion_ids[1:], even.completion_ids[3:])
