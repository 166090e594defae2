"""Gradient checkpointing on vs off for posttrain's SFT on CPU: seconds per optimizer step and peak RSS.

TRL turns `gradient_checkpointing` on by default; posttrain leaves it off (transformers' default). This measures
both on the built-in tiny model and on SmolLM2-135M (`posttrain/smollm2-135m-instruct`), one process per setting
(peak RSS is per process). Usage:
    taskset -c 0 nice env OMP_NUM_THREADS=1 python benchmarks/gradient_checkpointing.py [--model M] [--steps N]
`training_rss_mib`: the highest RSS sampled every 5 ms during train() minus the RSS after the trainer was built
(gradients, optimizer state, activations; a model loader's transient peak does not count).
Results: benchmarks/GRADIENT-CHECKPOINTING.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from transformers import TrainerCallback
from posttrain import SFTConfig, SFTTrainer
from posttrain.data.arith import load_builtin_dataset

model, gc, steps, batch, length = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
data = load_builtin_dataset("posttrain/arith-lm", "standard", split=f"train[:{batch * (steps + 1)}]")
data = data.map(lambda ex: {"text": (ex["text"] + " ") * 40})  # long enough rows to reach max_length
times = []

class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)

args = SFTConfig(output_dir="/tmp/gc-bench", max_steps=steps + 1, per_device_train_batch_size=batch, report_to="none",
                 save_strategy="no", max_length=length, gradient_checkpointing=gc, padding_free=False, logging_steps=100)
trainer = SFTTrainer(model, args=args, train_dataset=data, callbacks=[Clock()])
import gc as collector, threading, psutil
collector.collect()
process, samples, done = psutil.Process(), [], threading.Event()
before = process.memory_info().rss / 2**20  # model, data, libraries (after any load-time peak has gone)

def sample():
    while not done.wait(0.005):
        samples.append(process.memory_info().rss / 2**20)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
trainer.train()
done.set()
thread.join()
print(json.dumps({"s_per_step": sum(times[1:]) / len(times[1:]), "rss_before_mib": before,
                  "training_peak_rss_mib": max(samples), "training_rss_mib": max(samples) - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    a = parser.parse_args()
    for model in a.model or ["posttrain/tiny", "posttrain/smollm2-135m-instruct"]:
        for gc in (0, 1) * a.repeats:  # alternated: load on a shared machine drifts
            out = subprocess.run([sys.executable, "-c", CHILD, model, str(gc), str(a.steps), str(a.batch),
                                  str(a.length)], capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"model": model, "gradient_checkpointing": bool(gc), **row}), flush=True)


if __name__ == "__main__":
    main()
