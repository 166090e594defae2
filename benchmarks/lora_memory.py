"""Peak memory of LoRA DPO vs full DPO on the same model, batch and steps (CPU, fresh process per mode).

    python benchmarks/lora_memory.py                 # both modes; writes benchmarks/LORA.md
    python benchmarks/lora_memory.py --mode lora     # one mode, prints JSON

Measured: the peak resident set size of the process during trainer construction + STEPS optimizer steps, minus
the RSS just before the trainer is built (imports, tokenizer and data already loaded; the policy is loaded by the
trainer, so its weights count in both modes). Full DPO holds the policy, a reference copy, gradients and two AdamW
moments; LoRA DPO holds the policy once (the reference is the base with adapters off) and optimizer state for the
adapters only. Not measured: GPU memory (no GPU here), QLoRA (needs CUDA + bitsandbytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODEL = "posttrain/tiny-15m"
STEPS = 3
HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(mode: str, output_dir: str) -> dict:
    from peft import LoraConfig

    from posttrain import DPOConfig, DPOTrainer
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.models.builtin import builtin_model_path

    builtin_model_path(MODEL)  # materialise outside the measurement
    data = load_builtin_dataset("posttrain/arith-pref", split="train[:64]")
    args = DPOConfig(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2, max_length=64,
                     learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=1, seed=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") \
        if mode == "lora" else None
    before = _rss_mb()
    start = time.perf_counter()
    trainer = DPOTrainer(MODEL, args=args, train_dataset=data, peft_config=peft_config)
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {"mode": mode, "peak_delta_mib": round(peak - before, 1), "rss_before_mib": round(before, 1),
            "trainable_params": trainable, "model_params": total, "has_ref_copy": trainer.ref_model is not None,
            "seconds": round(time.perf_counter() - start, 1),
            "first_loss": trainer.state.log_history[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["full", "lora"])
    parser.add_argument("--output_dir", default="/tmp/posttrain-lora-memory")
    opts = parser.parse_args()
    if opts.mode:
        print(json.dumps(measure(opts.mode, os.path.join(opts.output_dir, opts.mode))))
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    results = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--output_dir", opts.output_dir],
                             env=env, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    ratio = results["lora"]["peak_delta_mib"] / results["full"]["peak_delta_mib"]
    rows = "\n".join(f"| {r['mode']} | {r['model_params']:,} | {r['trainable_params']:,} | "
                     f"{'yes' if r['has_ref_copy'] else 'no'} | {r['peak_delta_mib']:.1f} | {r['seconds']:.1f} |"
                     for r in results.values())
    text = f"""# LoRA vs full DPO: peak memory

`python benchmarks/lora_memory.py` on `{MODEL}` (DPO, {STEPS} steps, 2 pairs per step, max_length 64, AdamW,
float32, CPU; LoRA r=16 on all linear layers). Peak RSS growth from just before the trainer is built to the end of
training, each mode in a fresh process.

| mode | model params | trainable | reference copy | peak RSS delta (MiB) | seconds |
|---|---|---|---|---|---|
{rows}

LoRA / full peak memory: **{ratio:.2f}×**. Full DPO holds the policy, a reference copy, gradients and two AdamW
moments (≈ 5 × the weights); LoRA DPO holds the weights once (reference = base with adapters disabled) plus
adapter-sized gradients and optimizer state. Activations are the same in both modes, so the ratio falls further
as the model grows relative to the batch. GPU memory and QLoRA (4-bit base weights) were not measured here (no
CUDA on this machine).
"""
    with open(os.path.join(HERE, "LORA.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
