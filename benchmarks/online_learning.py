"""Does online RL learn? GRPO, RLOO and PPO from the same SFT model on the built-in arithmetic task, before/after.

Each method runs through the real command line (`posttrain <method> --config examples/<method>.yaml`, in this
process so its log history can be read), from the model `make demo` trains (outputs/sft-arith; trained first if
missing). Before and after, the model answers the 1,000 held-out test questions (posttrain/arith-prompts, test
split): greedy accuracy (one decode per question) and sampled accuracy (`--samples` samples per question at
temperature 1, the distribution RL trains and the expected reward it maximises), each compared question by question
with the base (`evaluation.paired_comparison`): questions fixed / broken (greedy) or whose fraction of right samples
went up / down (sampled), and the exact McNemar / sign-test p, which tells a one-point change from noise where the
±1-point standard error of each accuracy alone cannot. The training reward is the mean accuracy reward over the
first and last 20% of logged steps. Results go to benchmarks/LEARNING.md with the command and the machine.

    .venv/bin/python benchmarks/online_learning.py                    # grpo rloo ppo
    .venv/bin/python benchmarks/online_learning.py --methods grpo --base outputs/sft-arith
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from posttrain import cli
from posttrain.data.arith import TEST_ROWS, load_builtin_dataset
from posttrain.evaluation import generation_accuracy, paired_comparison
from posttrain.models.loading import load_pretrained_model, load_tokenizer

REWARD_KEYS = ("rewards/accuracy_reward/mean", "objective/scores")


def held_out(path: str, max_new_tokens: int, samples: int) -> dict:
    """Greedy and sampled accuracy on the test split, with each question's greedy right/wrong and its fraction of
    `samples` sampled answers right."""
    model, tok = load_pretrained_model(path), load_tokenizer(path)
    test = load_builtin_dataset("posttrain/arith-prompts", split="test")
    greedy = generation_accuracy(model, tok, test, max_new_tokens=max_new_tokens)
    sampled = generation_accuracy(model, tok, test, max_new_tokens=max_new_tokens, temperature=1.0,
                                  num_samples=samples)
    scores = [s or 0.0 for s in sampled["scores"]]
    per_question = [sum(scores[i:i + samples]) / samples for i in range(0, len(scores), samples)]
    return {"greedy": greedy["accuracy"], "greedy_each": [bool(s) for s in greedy["scores"]],
            "sampled": sampled["accuracy"], "sampled_each": per_question}


def train_reward(trainer) -> tuple[float, float]:
    """Mean accuracy reward over the first and the last 20% of logged training steps."""
    values = []
    for entry in trainer.state.log_history:
        key = next((k for k in REWARD_KEYS if k in entry), None)
        if key is not None and "eval_" not in key:
            values.append(entry[key])
    k = max(len(values) // 5, 1)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="outputs/sft-arith", help="SFT model to start from")
    parser.add_argument("--methods", nargs="+", default=["grpo", "rloo", "ppo"])
    parser.add_argument("--output", default="benchmarks/LEARNING.md")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8, help="sampled answers per held-out question")
    args, overrides = parser.parse_known_args(argv)  # the rest are flags for every method, e.g. --max_steps 20
    if not os.path.exists(os.path.join(args.base, "config.json")):
        print(f"{args.base} missing: training it with examples/sft.yaml first", flush=True)
        cli.run_training("sft", ["--config", "examples/sft.yaml", "--output_dir", args.base])
    b = held_out(args.base, args.max_new_tokens, args.samples)
    print(f"base {args.base}: greedy {b['greedy']:.3f}, sampled {b['sampled']:.3f}", flush=True)
    rows = []
    for method in args.methods:
        out = f"outputs/learning-{method}"
        start = time.time()
        trainer = cli.run_training(method, ["--config", f"examples/{method}.yaml", "--model_name_or_path",
                                            args.base, "--output_dir", out, "--save_strategy", "no",
                                            "--disable_tqdm", "true"] + overrides)
        minutes = (time.time() - start) / 60
        first, last = train_reward(trainer)
        a = held_out(out, args.max_new_tokens, args.samples)
        greedy = paired_comparison(b["greedy_each"], a["greedy_each"])
        sampled = paired_comparison(b["sampled_each"], a["sampled_each"])
        row = (f"| {method} | examples/{method}.yaml | {trainer.state.global_step} | {minutes:.1f} | {first:.3f} → "
               f"{last:.3f} | {b['greedy']:.3f} → {a['greedy']:.3f} | +{greedy['fixed']} / −{greedy['broken']} "
               f"(p={greedy['p_value']:.2g}) | {b['sampled']:.3f} → {a['sampled']:.3f} | +{sampled['fixed']} / "
               f"−{sampled['broken']} (p={sampled['p_value']:.2g}) |")
        rows.append(row)
        print(row, flush=True)
        del trainer
    lines = ["# Online RL learning on the built-in arithmetic task", "",
             f"`{' '.join(['python'] + sys.argv)}`  ",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; base model {args.base}; held-out = the {TEST_ROWS} test questions "
             f"(greedy: 1 decode each; sampled: {args.samples} samples each at temperature 1); RL prompts: the "
             "arith-prompts train split, questions the SFT stage never saw", "",
             "| method | config | steps | minutes | train accuracy reward (first → last 20%) | held-out greedy "
             "accuracy | greedy: questions fixed / broken (McNemar p) | held-out sampled accuracy | sampled: "
             "questions up / down (sign-test p) |",
             "|---|---|---|---|---|---|---|---|---|"] + rows
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
