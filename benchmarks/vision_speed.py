"""posttrain vs TRL 1.16 on a vision-language model: seconds per step, tokens/s and peak memory for SFT, DPO and GRPO
on the built-in posttrain/tiny-llava with the same image batches (posttrain/data/shapes.py), one fresh process per
run (so peak memory is that run's alone), the same call form for both libraries.

    OMP_NUM_THREADS=1 taskset -c 0 nice python benchmarks/vision_speed.py [--steps 10 --repeats 3] [--out FILE.md]

Variants: posttrain (defaults), trl-default (TRL's defaults, use_cpu on a machine without a GPU: bf16 autocast and
gradient checkpointing), trl-best (no gradient checkpointing, fp32). Tokens per step = the run's logged num_tokens
÷ steps (both libraries count the real prompt + completion tokens of the batch, image tokens included). Peak memory
= max RSS during trainer construction and training minus the RSS before. Workload: SFT 16 rows, DPO 8 pairs, GRPO 4
prompts x 8 completions of <= 8 tokens; each image is 32x32 (16 image tokens).

The workload (`vision_setup`, `load_vlm`) is shared with `compare_trl.py`, whose vision-sft / vision-dpo / vision-grpo
tasks put these rows beside the text tasks with its variants (bf16, GPU) and report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TASKS = ("sft", "dpo", "grpo")
VARIANTS = ("posttrain", "trl-default", "trl-best")
VISION_MODEL = "posttrain/tiny-llava"
# the workload in words (compare_trl.py's report prints it)
VISION_WORKLOAD = ("SFT 16 rows, DPO 8 pairs, GRPO 4 prompts × 8 completions of ≤ 8 tokens per step; each row one "
                   "32×32 image (16 image tokens) from posttrain/data/shapes.py")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _data(task: str, n: int):
    from posttrain.data.shapes import COLOURS, shapes_dataset

    if task == "sft":
        return shapes_dataset(n, "bench")
    rows = shapes_dataset(n, "bench", kind="prompt")
    if task == "grpo":
        return rows
    names = list(COLOURS)
    return rows.map(lambda ex: {"chosen": [{"role": "assistant", "content": ex["answer"]}],
                                "rejected": [{"role": "assistant", "content": names[(names.index(ex["answer"]) + 1)
                                                                                    % len(names)]}]},
                    remove_columns=["answer"])


def vision_setup(task: str, steps: int) -> dict:
    """What one run of `task` (sft, dpo, grpo) trains on, the same for both libraries: the built-in tiny-llava's
    path and processor, the image rows, the config options that fix the workload and the trainer's extra arguments.
    `compare_trl.py` runs its vision-* tasks from this too."""
    from posttrain.data.shapes import colour_reward
    from posttrain.models import vision

    path = vision.builtin_vlm_path(VISION_MODEL)
    batch = {"sft": 16, "dpo": 8, "grpo": 32}[task]
    config = dict(max_steps=steps, per_device_train_batch_size=batch)
    if task == "grpo":
        config.update(num_generations=8, max_completion_length=8)
    return {"path": path, "processor": vision.load_processor(path),
            "data": _data(task, batch * steps if task != "grpo" else 4 * steps), "config": config,
            "extra": {"reward_funcs": colour_reward} if task == "grpo" else {}}


def load_vlm(path: str):
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(path)


def run(task: str, variant: str, steps: int) -> dict:
    import transformers

    lib = __import__("posttrain" if variant == "posttrain" else "trl")
    setup = vision_setup(task, steps)
    name = task.upper()
    kwargs = dict(output_dir=f"/tmp/bench-vision-{task}-{variant}", logging_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, seed=0, **setup["config"])
    if variant != "posttrain":
        kwargs["use_cpu"] = True
    if variant == "trl-best":
        kwargs.update(gradient_checkpointing=False, bf16=False)
    args = getattr(lib, name + "Config")(**kwargs)
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    before = _rss_mib()
    trainer = getattr(lib, name + "Trainer")(model=load_vlm(setup["path"]), args=args, train_dataset=setup["data"],
                                               processing_class=setup["processor"], callbacks=[Clock()],
                                               **setup["extra"])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history) / steps
    seconds = statistics.median(times[1:] or times)
    return {"task": task, "variant": variant, "seconds_per_step": seconds, "tokens_per_step": tokens,
            "tokens_per_s": tokens / seconds, "peak_mib": peak - before,
            "first_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)}


def spawn(task: str, variant: str, steps: int) -> dict | None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", task, variant, "--steps",
                           str(steps)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{task}/{variant} failed: {' | '.join(proc.stderr.strip().splitlines()[-3:])}", flush=True)
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--repeats", type=int, default=3, help="runs per (task, variant), alternating; medians reported")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=2)
    opts = p.parse_args()
    if opts.worker:
        import warnings

        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(run(*opts.worker, opts.steps)), flush=True)
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(opts.repeats):  # alternate the variants so machine noise hits them alike
        for task in opts.tasks:
            for variant in VARIANTS:
                if (r := spawn(task, variant, opts.steps)) is not None:
                    runs.setdefault((task, variant), []).append(r)
    rows = []
    for (task, variant), results in runs.items():
        row = dict(results[0], runs=len(results))
        for key in ("seconds_per_step", "peak_mib", "tokens_per_step"):
            row[key] = statistics.median(r[key] for r in results)
        row["tokens_per_s"] = row["tokens_per_step"] / row["seconds_per_step"]
        rows.append(row)
    lines = ["| task | variant | s/step | tokens/step | tokens/s | vs TRL best | peak MiB | vs TRL best mem |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trl = [x for x in rows if x["task"] == r["task"] and x["variant"].startswith("trl")]
        best = min(trl, key=lambda x: x["seconds_per_step"]) if trl else None
        speed = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "—"
        memory = f"{r['peak_mib'] / best['peak_mib']:.2f}x" if best and best["peak_mib"] > 0 else "—"
        lines.append(f"| {r['task']} | {r['variant']} | {r['seconds_per_step']:.3f} | {r['tokens_per_step']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {speed} | {r['peak_mib']:.0f} | {memory} |")
    print("\n".join(lines))
    if opts.out:
        with open(opts.out, "w") as f:
            f.write("\n".join(lines) + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
