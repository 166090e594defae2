"""GRPO with a calculator tool, posttrain vs TRL 1.16 side by side (issue 24, speed): the same model, prompts, tool
and tool template in one run of `compare_trl.py --tasks grpo-tools`.

The instruct model does not call tools by itself (SmolLM2-135M-Instruct, shown Qwen2.5's tool prompt, answered
six word problems in prose), and a comparison of rollouts without tool calls would measure plain GRPO. So first a
short SFT (posttrain) on multi-turn tool traces — each worked solution's steps `a op b = c` become calculator calls,
the tool's results `tool` turns, then `#### N` — rendered with Qwen2.5's tool template, the one TRL parses; then
both libraries run GRPO from that model with `tools=[calculator]`, `max_tool_calling_iterations=3`.

    python benchmarks/agentic_compare.py [--sft_steps 20] [--steps 4] [--threads 2] [--max_tokens_per_backward 2048]

posttrain's runs use `max_tokens_per_backward: 2048` (the micro-batch's forward and backward in row slices of at most
2,048 tokens: the same update, half the peak memory here); `--max_tokens_per_backward 0` measures the default.

Writes benchmarks/RESULTS-agentic.{md,json} (compare_trl.py's report; tool calls per completion per run in the
JSON). The SFT model goes to outputs/agentic/smollm2-qwen-tools (reused when present).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare_tasks as setup  # noqa: E402
from agentic_demo import wordmath_tool_traces  # noqa: E402


def sft_tool_model(out: str, steps: int, threads: int) -> float:
    import torch

    from posttrain import SFTConfig, SFTTrainer
    from posttrain.models.loading import load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer("posttrain/smollm2-135m-instruct")
    tokenizer.chat_template = setup.tools_chat_template()
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-5,
                     lr_scheduler_type="constant", max_length=768, logging_steps=10, save_strategy="no",
                     report_to="none", seed=0)
    start = time.perf_counter()
    trainer = SFTTrainer("posttrain/smollm2-135m-instruct", args=args, train_dataset=wordmath_tool_traces(steps * 8),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run (median of steps 2..)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per GRPO step (8 completions each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["posttrain", "trl-default", "trl-best-fp32"])
    parser.add_argument("--model_dir", default="outputs/agentic/smollm2-qwen-tools")
    parser.add_argument("--max_tokens_per_backward", type=int, default=2048,
                        help="posttrain's option for its runs (0: off, the library default)")
    opts = parser.parse_args()
    if not os.path.isfile(os.path.join(opts.model_dir, "config.json")):
        seconds = sft_tool_model(opts.model_dir, opts.sft_steps, opts.threads)
        print(f"tool-use SFT: {opts.sft_steps} steps x 8 conversations in {seconds:.0f} s -> {opts.model_dir}")
    cmd = [sys.executable, os.path.join(HERE, "compare_trl.py"), "--tasks", setup.TOOLS_TASK, "--model",
           opts.model_dir, "--variants", *opts.variants, "--grpo_prompts", str(opts.prompts), "--generations", "8",
           "--max_new_tokens", "160", "--steps", str(opts.steps), "--repeats", "1", "--threads", str(opts.threads),
           "--fail_lines", "20", "--out", os.path.join(HERE, "RESULTS-agentic.md")]
    print(" ".join(cmd), flush=True)
    env = dict(os.environ)
    if opts.max_tokens_per_backward:  # posttrain's runs only (compare_trl applies it to the posttrain variants)
        env["POSTTRAIN_BENCH_OPTIONS"] = json.dumps({"max_tokens_per_backward": opts.max_tokens_per_backward})
        print(f"POSTTRAIN_BENCH_OPTIONS={env['POSTTRAIN_BENCH_OPTIONS']}")
    raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
