"""What the teacher top-k approximation (`teacher_top_k`, `losses/distill.py`) costs in fidelity, on one batch.

    taskset -c 0 python benchmarks/distill_topk_fidelity.py                 # SmolLM2-135M teacher, 4-layer student
    python benchmarks/distill_topk_fidelity.py --teacher posttrain/tiny-15m --student_layers 2

Teacher and student as in `distill_compare.py` (the student = the teacher's first layers). The batch: the built-in
arithmetic prompts with their reference solutions (teacher-forced, every solution token scored). For β ∈ {0, 0.5, 1}
and each k, the per-token divergence over the teacher's top-k tokens + one "rest" bucket is compared with the exact
divergence over the whole vocabulary: the mean value (the approximation is a lower bound), its relative gap, and the
cosine similarity of the gradient with respect to the student's logits (what training follows). Also the bytes the
teacher contributes per token (top-k: k log-probs + k ids; exact: the hidden state). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_compare import student_from_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="posttrain/smollm2-135m-instruct")
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--temperature", type=float, default=1.0)
    opts = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arith import load_builtin_dataset
    from posttrain.losses.distill import generalized_jsd, teacher_top_k, top_k_generalized_jsd

    teacher_dir, student_dir = student_from_teacher(opts.teacher, opts.student_layers)
    tok = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    rows = load_builtin_dataset("posttrain/arith-sft", split=f"train[:{opts.rows}]")
    student_logits, teacher_logits = [], []
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            ids = torch.tensor([prompt + tok(row["completion"], add_special_tokens=False)["input_ids"]])
            span = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the completion tokens
            student_logits.append(student(ids).logits[0, span])
            teacher_logits.append(teacher(ids).logits[0, span])
    s_all, t_all = torch.cat(student_logits), torch.cat(teacher_logits)
    n, vocab = s_all.shape
    hidden = teacher.config.hidden_size
    print(f"teacher {opts.teacher}, student = its first {opts.student_layers} layers; {n} completion tokens of "
          f"{opts.rows} arithmetic solutions (teacher-forced), vocabulary {vocab}, temperature {opts.temperature}\n")
    print("| β | k | exact mean | top-k mean | relative gap | gradient cosine | teacher bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for beta in (0.0, 0.5, 1.0):
        s = s_all.clone().requires_grad_(True)
        exact = generalized_jsd(s, t_all, beta, opts.temperature)
        (exact_grad,) = torch.autograd.grad(exact.sum(), s)
        print(f"| {beta} | all ({vocab}) | {exact.mean():.4f} | {exact.mean():.4f} | 0 | 1 | {hidden * 4} (hidden) |")
        for k in opts.ks:
            s = s_all.clone().requires_grad_(True)
            approx = top_k_generalized_jsd(s, *teacher_top_k(t_all, k, opts.temperature), beta, opts.temperature)
            (grad,) = torch.autograd.grad(approx.sum(), s)
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0)
            gap = (exact.mean() - approx.mean()) / exact.mean()
            print(f"| {beta} | {k} | {exact.mean():.4f} | {approx.mean():.4f} | {gap:.1%} | {cosine:.4f} | "
                  f"{k * 12} |")


if __name__ == "__main__":
    main()
