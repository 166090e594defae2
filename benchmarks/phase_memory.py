"""Where a posttrain online run's memory peaks: peak RSS growth per phase of a `compare_trl.py` workload.

A sampler thread reads the process's RSS every 5 ms and files it under the phase running then: the online trainer's
timed phases (`generate`, `score`, `old_logps`, `reference`, …; `OnlineTrainer.phase`), `train_step` (forward and
backward of a micro-batch) and `between` (optimizer step, logging). With `--layers` the training step is split
further by module hooks: the decoder layers' forward, the head and loss after them, the backward of the head and
loss, the layers' backward, and what follows the first layer's backward (the input embedding's gradient). At every
optimizer step it also counts the bytes of all live tensors (weights, gradients, optimizer state), so that the RSS
growth not held by any tensor — memory the allocator keeps after frees, Python, libraries — shows. Growth is from
the RSS after the imports.

    python benchmarks/phase_memory.py --task grpo-tools --model PATH [--steps 2] [--options '{"max_tokens_per_backward": 2048}']
    taskset -c 0 python benchmarks/phase_memory.py --task grpo --model posttrain/smollm2-135m-instruct \
        --workload smollm2 --variant posttrain-bf16 --steps 5 --threads 1 --layers

Prints one JSON line {phase: peak MiB}, the optimizer-step line and the run's compare_trl figures (peak MiB, s/step).
RSS keeps memory the allocator has not returned, so a phase's peak includes what earlier phases left: read it as
"the peak was reached in".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
from compare_report import WORKLOADS, apply_workload  # noqa: E402

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
    parser.add_argument("--variant", default="posttrain", choices=["posttrain", "posttrain-bf16"])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="compare_trl.py's size presets")
    parser.add_argument("--layers", action="store_true", help="split the training step by decoder layer hooks")
    opts = parser.parse_args()
    apply_workload(parser, opts)
    if opts.options:
        os.environ["POSTTRAIN_BENCH_OPTIONS"] = opts.options
    setup.configure(types.SimpleNamespace(device="cpu", model=opts.model, batch=8, steps=opts.steps, min_tokens=64,
                                          max_tokens=256, grpo_prompts=opts.grpo_prompts,
                                          generations=opts.generations, max_new_tokens=opts.max_new_tokens,
                                          threads=opts.threads))
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

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
    if opts.layers:
        _split_training_step(state)
    steps = []

    def at_optimizer_step(optimizer, args, kwargs) -> None:
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        steps.append((rss_mib() - state["base"], sum(storages.values()) / 2**20))

    register_optimizer_step_post_hook(at_optimizer_step)
    result = compare_trl.run_library(opts.task, opts.variant)
    print(json.dumps({name: round(peak - state["base"]) for name, peak in state["peaks"].items()}))
    growth, live = steps[-1]
    print(f"after the last optimizer step: RSS growth {growth:.0f} MiB, live tensors {live:.0f} MiB (weights, "
          f"gradients, optimizer state), not held by any tensor {growth - live:.0f} MiB")
    print(f"peak growth {result['peak_mib']:.0f} MiB, {result['seconds_per_step']:.1f} s/step")


def _split_training_step(state: dict) -> None:
    """Name the parts of a training step from global module hooks on the decoder layers (class names ending in
    DecoderLayer): forward through them, the head and loss after the last, the backward down to the last layer,
    through the layers, and below the first (the input embedding)."""
    import torch

    index: dict[int, int] = {}

    def is_layer(module) -> bool:
        return type(module).__name__.endswith("DecoderLayer")

    def forward_pre(module, args):
        if is_layer(module) and torch.is_grad_enabled() and state["phase"].startswith("train_step"):
            index.setdefault(id(module), len(index))
            state["phase"] = "train_step: layers forward"

    def forward_post(module, args, output):
        if (is_layer(module) and state["phase"] == "train_step: layers forward"
                and index.get(id(module)) == len(index) - 1):
            state["phase"] = "train_step: head and loss forward"

    def backward_pre(module, grad_output):
        if is_layer(module):
            state["phase"] = "train_step: layers backward"

    def backward_post(module, grad_input, grad_output):
        if is_layer(module) and index.get(id(module)) == 0:
            state["phase"] = "train_step: embedding backward"

    tensor_backward = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):
        state["phase"] = "train_step: head and loss backward"
        try:
            return tensor_backward(tensor, *args, **kwargs)
        finally:
            state["phase"] = "train_step"

    torch.nn.modules.module.register_module_forward_pre_hook(forward_pre)
    torch.nn.modules.module.register_module_forward_hook(forward_post)
    torch.nn.modules.module.register_module_full_backward_pre_hook(backward_pre)
    torch.nn.modules.module.register_module_full_backward_hook(backward_post)
    torch.Tensor.backward = backward


if __name__ == "__main__":
    main()
