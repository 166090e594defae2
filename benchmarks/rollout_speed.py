"""Completions per second of posttrain's rollout against a naive per-completion `generate`, same prompts and lengths.

Three ways to sample G completions for each of P prompts, every completion exactly `--new_tokens` long
(`min_new_tokens` = `max_new_tokens`, so all paths generate the same number of tokens):

    naive     one `model.generate` call per completion (what a hand-written RL loop often does)
    batched   one `generate` call over all P×G rows (each prompt row repeated G times: G prefills per prompt)
    posttrain `posttrain.rollout.hf.generate`: one call, each prompt prefilled once and its cache shared by its G rows

Workloads: the built-in arithmetic prompts (~30 tokens) and the same prompts behind a few-shot preamble (~200
tokens), where prefill sharing matters more. Runs alternate between methods; the median of `--repeats` is reported.

    .venv/bin/python benchmarks/rollout_speed.py                     # writes benchmarks/ROLLOUT.md
    .venv/bin/python benchmarks/rollout_speed.py --model posttrain/tiny-15m --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from posttrain.data.arith import generate_problems, load_builtin_dataset
from posttrain.data.tokenize import tokenize_prompt
from posttrain.models.loading import load_pretrained_model, load_tokenizer
from posttrain.rollout.hf import generate, left_pad


def few_shot_preamble(shots: int) -> str:
    problems = generate_problems(shots, seed=99)
    return "".join(f"Question: {p.question}\nAnswer: {p.solution}\n\n" for p in problems)


def naive(model, tok, prompt_ids, G, new_tokens, gen):
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        for _ in range(G):
            out.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, **gen))
    return len(out)


def batched(model, tok, prompt_ids, G, new_tokens, gen):
    ids, mask = left_pad(prompt_ids, tok.pad_token_id)
    out = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, **gen)
    return out.shape[0]


def ours(model, tok, prompt_ids, G, new_tokens, gen):
    rollout = generate(model, tok, prompt_ids, G, new_tokens, dict(gen, min_new_tokens=new_tokens))
    return rollout.completion_ids.shape[0]


METHODS = {"naive": naive, "batched": batched, "posttrain": ours}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="posttrain/tiny-4m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/ROLLOUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained_model(args.model).eval()
    tok = load_tokenizer(args.model)
    rows = load_builtin_dataset("posttrain/arith-prompts", split="test")[: args.prompts]["prompt"]
    gen = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}  # GRPO's defaults (TRL's too)
    lines = [f"# Rollout speed: completions/s, {args.model}",
             "", f"`{' '.join(['python'] + sys.argv)}`  ", f"machine: {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {args.threads} threads; {args.prompts} prompts × G={args.num_generations}, "
             f"{args.new_tokens} new tokens each, median of {args.repeats} alternating runs", "",
             "| prompts | prompt tokens | naive | batched | posttrain | posttrain ÷ naive | posttrain ÷ batched |",
             "|---|---|---|---|---|---|---|"]
    for label, preamble in (("arith", ""), ("arith + 6-shot preamble", few_shot_preamble(6))):
        prompt_ids = [tokenize_prompt(tok, preamble + p) for p in rows]
        mean_len = sum(map(len, prompt_ids)) / len(prompt_ids)
        times = {m: [] for m in METHODS}
        with torch.no_grad():
            ours(model, tok, prompt_ids[:1], 2, 4, gen)  # warm-up
            for _ in range(args.repeats):
                for name, fn in METHODS.items():
                    start = time.perf_counter()
                    n = fn(model, tok, prompt_ids, args.num_generations, args.new_tokens, gen)
                    times[name].append(n / (time.perf_counter() - start))
        rate = {m: statistics.median(v) for m, v in times.items()}
        lines.append(f"| {label} | {mean_len:.0f} | {rate['naive']:.1f} | {rate['batched']:.1f} | "
                     f"{rate['posttrain']:.1f} | {rate['posttrain'] / rate['naive']:.1f}× | "
                     f"{rate['posttrain'] / rate['batched']:.2f}× |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
