"""The figures of the README's "Real models and GGUF" section: conversion and load times of the built-in SmolLM2, and
for each export type the file size, export time, read-back time and how far the read-back logits are from the
model's own, on the chat-formatted held-out arithmetic questions.

    .venv/bin/python benchmarks/gguf_roundtrip.py                          # posttrain/smollm2-135m-instruct
    .venv/bin/python benchmarks/gguf_roundtrip.py --model posttrain/tiny-llama --questions 4

Per export type: max |Δ logit| (absolute, and over the largest |logit|), the mean KL divergence of the next-token
distribution from the model's own, the loss (mean next-token NLL of the texts) before → after, and the share of
positions whose most likely next token is unchanged. A fresh $POSTTRAIN_CACHE measures the conversion.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from posttrain.data.arith import load_builtin_dataset
from posttrain.models import loading
from posttrain.models.gguf_export import OUTTYPES, export_gguf


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="posttrain/smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=8)
    args = parser.parse_args()
    path, convert_s = _timed(loading.resolve_model_path, args.model)
    model, load_s = _timed(loading.load_pretrained_model, args.model)
    tok = loading.load_tokenizer(args.model)
    print(f"{args.model}: resolve/convert {convert_s:.1f}s, load {load_s:.2f}s ({path})")
    rows = load_builtin_dataset("posttrain/arith-sft", "conversational", split=f"test[:{args.questions}]")
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    batch = tok(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    ref = _logits(model, batch)
    print(f"{mask.sum().item()} positions; max |logit| {ref[mask].abs().max().item():.2f}")
    targets = batch["input_ids"][:, 1:][mask[:, 1:]]
    ref_nll = torch.nn.functional.cross_entropy(ref[:, :-1][mask[:, 1:]], targets).item()
    print("| outtype | size (MiB) | export s | read-back s | max abs Δ logit | relative | mean KL (nats) | "
          "loss | same top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in OUTTYPES:
            out = os.path.join(tmp, f"model-{outtype}.gguf")
            info, export_s = _timed(export_gguf, model, tok, out, outtype)
            back, read_s = _timed(loading.load_pretrained_model, out)
            got = _logits(back, batch)
            diff = (got - ref)[mask].abs().max().item()
            ref_logp, got_logp = ref.log_softmax(-1)[mask], got.log_softmax(-1)[mask]
            kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1).mean().item()
            nll = torch.nn.functional.cross_entropy(got[:, :-1][mask[:, 1:]], targets).item()
            top1 = (got.argmax(-1) == ref.argmax(-1))[mask].float().mean().item()
            print(f"| {outtype} | {info['bytes'] / 2**20:.1f} | {export_s:.1f} | {read_s:.1f} | {diff:.3g} | "
                  f"{diff / ref[mask].abs().max().item():.2g} | {kl:.2g} | {ref_nll:.4f} → {nll:.4f} | "
                  f"{top1:.4f} |", flush=True)
            del back


if __name__ == "__main__":
    main()
