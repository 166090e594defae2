"""SFT throughput with and without packing / padding-free batches, on the same data, in one run.

    python benchmarks/sft_packing.py [--model posttrain/tiny-4m] [--docs 768] [--repeats 2]

Data: built-in arithmetic problems joined 1–6 per document, so lengths vary (≈40–300 tokens) as in real SFT data.
Each mode trains one epoch over the same documents; tokens/s counts real (non-pad) tokens. Modes alternate across
repeats so machine noise hits all of them alike. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import datasets
import torch

from posttrain import SFTConfig, SFTTrainer
from posttrain.data.arith import load_builtin_dataset

MODES = {
    "padded (no packing)": {},
    "packing bfd": {"packing": True},
    "padding_free": {"padding_free": True},
}


def varied_documents(n: int, seed: int = 0) -> datasets.Dataset:
    rows = load_builtin_dataset("posttrain/arith-lm", split="train")["text"]
    rng = random.Random(seed)
    return datasets.Dataset.from_dict({"text": ["\n\n".join(rng.sample(rows, rng.randint(1, 6))) for _ in range(n)]})


def run(model: str, data: datasets.Dataset, mode: dict, batch_size: int, max_length: int, out: str) -> dict:
    args = SFTConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                     report_to="none", save_strategy="no", logging_steps=10_000, max_length=max_length,
                     disable_tqdm=True, seed=0, **mode)
    trainer = SFTTrainer(model, args=args, train_dataset=data)
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens/s": real_tokens / seconds, "steps": trainer.state.global_step, "seconds": seconds,
            "real tokens": real_tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="posttrain/tiny-4m")
    parser.add_argument("--docs", type=int, default=768)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = varied_documents(opts.docs)
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    for repeat in range(opts.repeats):
        for name, mode in MODES.items():
            results[name].append(run(opts.model, data, mode, opts.batch_size, opts.max_length, "/tmp/sft-bench"))
            print(f"repeat {repeat}: {name}: {results[name][-1]['tokens/s']:.0f} tokens/s", flush=True)
    base = statistics.median(r["tokens/s"] for r in results["padded (no packing)"])
    print(f"\nmodel {opts.model}, {opts.docs} documents, batch {opts.batch_size}, max_length {opts.max_length}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| mode | steps | real tokens/s (median) | vs padded |\n|---|---|---|---|")
    for name, runs in results.items():
        tps = statistics.median(r["tokens/s"] for r in runs)
        print(f"| {name} | {runs[0]['steps']} | {tps:.0f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
