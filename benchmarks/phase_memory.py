"""Where a posttrain online run's memory peaks: peak RSS growth per phase of a `compare_trl.py` workload.

A sampler thread reads the process's RSS every 5 ms and files it under the phase running then: the online trainer's
timed phases (`generate`, `score`, `old_logps`, `reference`, …; `OnlineTrainer.phase`), `train_step` (forward and
backward of a micro-batch) and `between` (optimizer step, logging). Growth is from the RSS after the imports.

    python benchmarks/phase_memory.py --task grpo-tools --model PATH [--steps 2] [--options '{"max_tokens_per_backward": 2048}']

Prints one JSON line {phase: peak MiB} and the run's compare_trl figures (peak MiB, s/step). RSS keeps memory the
allocator has not returned, so a phase's peak includes what earlier phases left: read it as "the peak was reached in".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import compare_tasks as setup  # noqa: E402
import compare_trl  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="grpo-tools", choices=["grpo", setup.TOOLS_TASK])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--grpo_prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", default=None, help="posttrain config options as JSON (POSTTRAIN_BENCH_OPTIONS)")
    opts = parser.parse_args()
    if opts.options:
        os.environ["POSTTRAIN_BENCH_OPTIONS"] = opts.options
    setup.configure(types.SimpleNamespace(device="cpu", model=opts.model, batch=8, steps=opts.steps, min_tokens=64,
                                          max_tokens=256, grpo_prompts=opts.grpo_prompts,
                                          generations=opts.generations, max_new_tokens=opts.max_new_tokens,
                                          threads=opts.threads))
    import torch

    from posttrain.trainers import base, online

    torch.set_num_threads(opts.threads)
    state = {"phase": "setup", "peaks": {}, "base": rss_mib()}

    def sample() -> None:
        while True:
            value, phase = rss_mib(), state["phase"]
            state["peaks"][phase] = max(value, state["peaks"].get(phase, 0.0))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    timed_phase = online.OnlineTrainer.phase

    @contextlib.contextmanager
    def phase(self, name):
        before, state["phase"] = state["phase"], name
        try:
            with timed_phase(self, name):
                yield
        finally:
            state["phase"] = before

    training_step = base.PostTrainer.training_step

    def traced_training_step(self, *args, **kwargs):
        state["phase"] = "train_step"
        try:
            return training_step(self, *args, **kwargs)
        finally:
            state["phase"] = "between"

    online.OnlineTrainer.phase = phase
    base.PostTrainer.training_step = traced_training_step
    result = compare_trl.run_library(opts.task, "posttrain")
    print(json.dumps({name: round(peak - state["base"]) for name, peak in state["peaks"].items()}))
    print(f"peak growth {result['peak_mib']:.0f} MiB, {result['seconds_per_step']:.1f} s/step")


if __name__ == "__main__":
    main()
