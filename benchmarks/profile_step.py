"""Where one training step's time goes: a torch.profiler split of one posttrain step into matmuls (model body and
LM head), attention, the head's element-wise work (log-softmax and its gradient), norms/activations and other
element-wise ops, memory traffic (copies, fills, new tensors), the optimizer and the rest (Python, data, hooks),
with the kernel time (page faults) of the step beside it.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/profile_step.py --task sft \
        --model posttrain/smollm2-135m-instruct --workload smollm2 --threads 1

The trainer, data and workload flags are those of `compare_trl.py` (from `compare_tasks.py`: the same rows, the
same config); the step profiled is the last of --steps (the earlier ones warm up). Prints one table and one JSON
line. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_tasks
from compare_report import WORKLOADS, apply_workload

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot")
MEMORY = ("aten::copy_", "aten::fill_", "aten::zero_", "aten::empty", "aten::empty_strided", "aten::cat",
          "aten::index_select", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::resize_",
          "aten::masked_scatter", "aten::index", "aten::new_zeros", "aten::zeros", "aten::scatter_add_")


def _category(event, vocab: int, ancestor: str | None) -> str:
    name = event.name
    if ancestor is not None:
        return ancestor
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, (list, tuple))]
    vocab_shaped = any(vocab in s for s in shapes)
    if name in MATMUL:
        return "matmul: LM head" if vocab_shaped else "matmul: model body"
    if "attention" in name or "sdpa" in name.lower():
        return "attention (SDPA)"
    if vocab_shaped:
        return "LM head element-wise (log-softmax, its gradient)"
    if name in MEMORY:
        return "memory (copies, fills, new tensors)"
    if name.startswith(("aten::", "torch::autograd")) or "Backward" in name:
        return "norms, activations, other element-wise"
    return "other"


def _ancestor(event) -> str | None:
    """The optimizer or an online trainer's phase (trainers/online.py names them) this op ran under."""
    parent = event.cpu_parent
    while parent is not None:
        if "Optimizer.step" in parent.name:
            return "optimizer (AdamW)"
        if parent.name.startswith("phase:"):
            return {"phase:generate": "generation (rollout)"}.get(parent.name, parent.name + " (no-grad passes)")
        parent = parent.cpu_parent
    return None


def profile(task: str, steps: int) -> dict:
    import transformers
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import posttrain as lib

    model_path = compare_tasks._model_path(compare_tasks.MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    dataset = compare_tasks.build_dataset(task, tokenizer)
    names = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO"}
    args = getattr(lib, names[task] + "Config")(**compare_tasks._config_kwargs(task, "posttrain", f"/tmp/prof-{task}"))
    record: dict = {}

    class Profiled(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == steps - 1:
                record["prof"] = torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                record["prof"].__enter__()
                record["usage"] = resource.getrusage(resource.RUSAGE_SELF)
                record["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if "prof" in record and "wall" not in record:
                record["wall"] = time.perf_counter() - record["t"]
                usage = resource.getrusage(resource.RUSAGE_SELF)
                record["sys"] = usage.ru_stime - record["usage"].ru_stime
                record["faults"] = usage.ru_minflt - record["usage"].ru_minflt
                record["prof"].__exit__(None, None, None)

    kwargs = dict(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[Profiled()])
    if task == "grpo":
        kwargs["reward_funcs"] = compare_tasks._digit_share_reward
    trainer = getattr(lib, names[task] + "Trainer")(**kwargs)
    args.max_steps = steps
    trainer.train()
    vocab = trainer.model.config.vocab_size
    split: dict[str, float] = defaultdict(float)
    for event in record["prof"].events():
        if event.cpu_parent is None and event.name.startswith("ProfilerStep"):
            continue
        split[_category(event, vocab, _ancestor(event))] += event.self_cpu_time_total / 1e6
    split.pop("other", None)
    split["rest (Python, data, hooks, generation bookkeeping)"] = record["wall"] - sum(split.values())
    top = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in record["prof"].key_averages()),
                 key=lambda x: -x[1])[:12]
    return {"task": task, "wall_s": record["wall"], "sys_s": record["sys"], "minor_faults": record["faults"],
            "split_s": dict(split), "top_ops": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sft", choices=("sft", "dpo", "grpo"))
    parser.add_argument("--model", default=compare_tasks.MODEL)
    parser.add_argument("--workload", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=3, help="Steps run; the last is profiled.")
    parser.add_argument("--threads", type=int, default=1)
    for name in ("batch", "min_tokens", "max_tokens", "grpo_prompts", "generations", "max_new_tokens"):
        parser.add_argument(f"--{name}", type=int, default=getattr(compare_tasks, {
            "batch": "BATCH", "min_tokens": "MIN_TOKENS", "max_tokens": "MAX_TOKENS", "max_new_tokens":
            "MAX_NEW_TOKENS", "generations": "GRPO_GENERATIONS"}.get(name, "BATCH")))
    opts = parser.parse_args()
    if "--grpo_prompts" not in sys.argv:
        opts.grpo_prompts = compare_tasks.GRPO_BATCH // compare_tasks.GRPO_GENERATIONS
    apply_workload(parser, opts)
    opts.device, opts.steps_run = "cpu", opts.steps
    import torch

    torch.set_num_threads(opts.threads)
    steps = opts.steps
    opts.steps = steps
    compare_tasks.configure(opts)
    result = profile(opts.task, steps)
    wall = result["wall_s"]
    print(f"\n{opts.task}: one step {wall:.2f} s (kernel time {result['sys_s']:.2f} s, "
          f"{result['minor_faults']} page faults)")
    for name, seconds in sorted(result["split_s"].items(), key=lambda x: -x[1]):
        print(f"  {name:55s} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
    print("  top ops (self time):")
    for key, seconds, count in result["top_ops"]:
        print(f"    {key:40s} {seconds:7.2f} s  ×{count}")
    print("PROFILE " + json.dumps(result))


if __name__ == "__main__":
    main()
