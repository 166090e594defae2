"""posttrain's DistillationTrainer vs TRL 1.16's, side by side: tokens/s, seconds/step, peak memory.

    taskset -c 0 python benchmarks/distill_compare.py --threads 1 --out benchmarks/RESULTS-distillation.md
    taskset -c 0 python benchmarks/distill_compare.py --teacher posttrain/smollm2-135m-instruct --student_layers 4 \
        --completion 32 --threads 1 --out /tmp/distill-smollm2.md
    python benchmarks/distill_compare.py --worker posttrain     # one run in this process, prints one JSON line

Workload: the teacher (default the built-in `posttrain/tiny-15m`: Qwen2 shape, 6 layers, 32k vocabulary; or the
packaged SmolLM2-135M-Instruct) and a student cut from it — its embeddings, its first `--student_layers` layers,
its final norm and head (same tokenizer by construction) — written once under /tmp. Prompts: the built-in arithmetic
prompts; `--batch` prompts per optimizer step, one completion each (TRL's distillation samples one), every completion
exactly `--completion` tokens (min_new_tokens = max_completion_length, so both libraries train on the same number of
tokens whatever the samples); β = 0.5 (JSD) so both divergence branches run; `--steps` steps, the first not timed.

Every run is a fresh process (peak memory is that run's alone) with the same call form for both libraries —
`DistillationTrainer(model=student_dir, teacher_model=teacher_dir, args=DistillationConfig(...), train_dataset=...)`,
`from posttrain` or `from trl` — and the same config keys. Runs alternate (posttrain, TRL default, TRL best, …).
Variants: posttrain (its defaults); trl-default (TRL's defaults: bf16 autocast and gradient checkpointing, plus
use_cpu=True, without which TRL stops on a CPU); trl-best-fp32 (no gradient checkpointing, fp32).
Measured per run: median CPU seconds (of this single-threaded process: what other processes on a shared core do not
inflate) and wall-clock seconds per optimizer step after the first; tokens per step = prompt + completion tokens of
every row; peak RSS growth from just before the trainer is built (both models are loaded inside it) to the end.
Not a test: nothing here asserts a speed.
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

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("posttrain", "trl-default", "trl-best-fp32")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def student_layer_indices(total: int, layers: int, pick: str = "first") -> list[int]:
    """Which of the teacher's `total` layers a `layers`-layer student keeps: "first" the first ones; "spread" evenly
    spaced ones from the first to the last (30 → 6: 0, 6, 12, 17, 23, 29); "ends" the first ⌈layers/2⌉ and the last
    ⌊layers/2⌋ (30 → 6: 0, 1, 2, 27, 28, 29), so the student keeps the teacher's input and output layers and its
    residual stream ends where the teacher's final norm and head expect it."""
    if not 1 <= layers <= total:
        raise ValueError(f"student_layers must be in [1, {total}], got {layers}")
    if pick == "first":
        return list(range(layers))
    if pick == "spread":
        return [0] if layers == 1 else [round(i * (total - 1) / (layers - 1)) for i in range(layers)]
    if pick == "ends":
        head = (layers + 1) // 2
        return list(range(head)) + list(range(total - (layers - head), total))
    raise ValueError(f"student layer pick must be 'first', 'spread' or 'ends', got {pick!r}")


def student_from_teacher(teacher: str, layers: int, pick: str = "first") -> tuple[str, str]:
    """(teacher directory, student directory): the student keeps the teacher's embeddings, `layers` of its layers
    (`student_layer_indices`), final norm and head (built once, cached under /tmp)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.loading import resolve_model_path

    teacher_dir = resolve_model_path(teacher)
    name = teacher.strip("/").replace("/", "--")
    out = f"/tmp/posttrain-distill-students/{name}-{layers}" + ("" if pick == "first" else f"-{pick}")
    if not os.path.exists(os.path.join(out, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        keep = student_layer_indices(len(model.model.layers), layers, pick)
        model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
        for new_index, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
            if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
                layer.self_attn.layer_idx = new_index
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return teacher_dir, out


def prompts(n: int):
    from posttrain.data.arith import load_builtin_dataset

    return load_builtin_dataset("posttrain/arith-prompts", split=f"train[:{n}]").select_columns(["prompt"])


def run(variant: str, opts) -> dict:
    import torch
    import transformers

    lib = __import__("posttrain" if variant == "posttrain" else "trl")
    teacher_dir, student_dir = student_from_teacher(opts.teacher, opts.student_layers)
    tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir)
    data = prompts(opts.batch * opts.steps)
    per_step = opts.batch * (statistics.mean(len(tokenizer(p)["input_ids"]) for p in data["prompt"])
                             + opts.completion)
    kw = dict(output_dir=f"/tmp/bench-distill-{variant}", max_steps=opts.steps, per_device_train_batch_size=opts.batch,
              learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
              beta=0.5, max_completion_length=opts.completion, shuffle_dataset=False,
              generation_kwargs={"min_new_tokens": opts.completion})
    if variant.startswith("trl"):
        kw["use_cpu"] = True
    if variant == "trl-best-fp32":
        kw.update(gradient_checkpointing=False, bf16=False)
    args = lib.DistillationConfig(**kw)
    step_times: list[float] = []

    cpu_times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.cpu)

    before = _rss_mib()
    trainer = lib.DistillationTrainer(model=student_dir, teacher_model=teacher_dir, args=args, train_dataset=data,
                                      processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = statistics.median(step_times[1:] or step_times)
    cpu_seconds = statistics.median(cpu_times[1:] or cpu_times)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"variant": variant, "seconds_per_step": seconds, "cpu_seconds_per_step": cpu_seconds,
            "tokens_per_step": per_step, "tokens_per_s": per_step / seconds,
            "tokens_per_cpu_s": per_step / cpu_seconds, "peak_mib": peak - before, "steps": len(step_times),
            "threads": torch.get_num_threads(), "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "first_loss": losses[0] if losses else None}


def spawn(variant: str, argv: list[str]) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {variant} failed: {' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}", flush=True)
    return None


def write_report(path: str, command: str, opts, results: dict[str, list[dict]]) -> None:
    def med(variant, key):
        return statistics.median(r[key] for r in results[variant])

    ours = "posttrain"
    trl_runs = [v for v in VARIANTS if v.startswith("trl") and results.get(v)]
    best = max(trl_runs, key=lambda v: med(v, "tokens_per_cpu_s")) if trl_runs else None
    lines = [f"# Distillation: posttrain vs TRL {__import__('trl').__version__} DistillationTrainer", "",
             f"`{command}`", "",
             f"Teacher `{opts.teacher}`, student = its first {opts.student_layers} layers (same tokenizer); "
             f"{opts.batch} prompts × 1 completion of {opts.completion} tokens per step, β = 0.5, {opts.steps} steps "
             f"(first not timed), {opts.threads} thread(s), medians over {opts.repeats} alternating repeat(s).", "",
             "Speed is counted in CPU seconds of the (single-threaded) process, which other processes on a shared "
             "core do not inflate; wall-clock seconds are shown beside it.", "",
             "| variant | CPU s/step | tokens per CPU s | wall s/step | peak MiB | speed vs TRL default | "
             "memory vs TRL default | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    base = "trl-default" if results.get("trl-default") else best
    for variant in VARIANTS:
        if not results.get(variant):
            continue
        speed = med(variant, "tokens_per_cpu_s") / med(base, "tokens_per_cpu_s") if base else float("nan")
        memory = med(variant, "peak_mib") / med(base, "peak_mib") if base else float("nan")
        loss = results[variant][0]["first_loss"]
        lines.append(f"| {variant} | {med(variant, 'cpu_seconds_per_step'):.3f} | "
                     f"{med(variant, 'tokens_per_cpu_s'):.0f} | {med(variant, 'seconds_per_step'):.3f} | "
                     f"{med(variant, 'peak_mib'):.0f} | {speed:.2f}x | {memory:.2f}x | "
                     f"{'' if loss is None else f'{loss:.4f}'} |")
    if best and results.get(ours):
        lines += ["", f"posttrain vs the fastest TRL run ({best}): "
                  f"{med(ours, 'tokens_per_cpu_s') / med(best, 'tokens_per_cpu_s'):.2f}x tokens per CPU second, "
                  f"{med(ours, 'peak_mib') / med(best, 'peak_mib'):.2f}x peak memory."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"command": command, "results": results}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="posttrain/tiny-15m")
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="Prompts (= completions) per optimizer step.")
    parser.add_argument("--completion", type=int, default=64, help="Tokens generated per completion (exactly).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS-distillation.md"))
    parser.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    if opts.worker:
        print("RESULT " + json.dumps(run(opts.worker, opts)), flush=True)
        return
    argv = [a for a in sys.argv[1:]]
    for flag in ("--out", "--repeats", "--variants"):  # orchestration flags stay here
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2 if flag != "--variants" else i + 1 + len(opts.variants)]
    student_from_teacher(opts.teacher, opts.student_layers)  # once, before the timed runs
    command = "python benchmarks/distill_compare.py " + " ".join(sys.argv[1:])
    results: dict[str, list[dict]] = {}
    for repeat in range(opts.repeats):
        for variant in opts.variants:
            result = spawn(variant, argv)
            if result:
                results.setdefault(variant, []).append(result)
                print(f"repeat {repeat}: {variant:14s} {result['cpu_seconds_per_step']:.3f} CPU s/step "
                      f"{result['seconds_per_step']:.3f} s/step "
                      f"{result['tokens_per_s']:.0f} tok/s peak +{result['peak_mib']:.0f} MiB "
                      f"loss {result['first_loss']}", flush=True)
                write_report(opts.out, command, opts, results)


if __name__ == "__main__":
    main()
