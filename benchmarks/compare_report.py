"""The report side of `compare_trl.py`: workload presets, the machine's matmul ceilings, model FLOPs per token,
and RESULTS.md written from the runs' figures (also alone: `compare_trl.py --report_only` rewrites RESULTS.md
from RESULTS.json).

Not here: running the variants and measuring them (`compare_trl.py`).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

TASKS = ("sft", "dpo", "grpo", "reward", "kto", "grpo-tools", "vision-sft", "vision-dpo", "vision-grpo")
VISION_PREFIX = "vision-"  # the vision tasks: the same trainers on posttrain/tiny-llava with images (vision_speed.py)
VARIANTS = ("posttrain", "posttrain-bf16", "trl-default", "trl-best-fp32", "trl-best-bf16", "plain")
GPU_MATMUL_SIZE = 8192  # 2048² is launch-bound on a large GPU
# Vendor datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by device-name fragment (first match wins).
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989.4e12),
                  ("H200", 989.4e12), ("GH200", 989.4e12), ("A100", 312e12), ("L40S", 362.05e12), ("L4", 121e12))
KEPT_SECTION = "## Techniques"
# Runs stored before these options existed: the defaults above, on a CPU.
DEFAULT_WORKLOAD = {"model": "posttrain/tiny-15m", "device": "cpu", "batch": 8, "steps": 6, "tokens": [64, 256],
                    "grpo_batch": 16, "generations": 8, "max_new_tokens": 128}


# Workload presets: flag values (explicit flags win) and what the shape stands for.
WORKLOADS = {
    "grpo-small-groups": ({"generations": 4, "grpo_prompts": 2, "max_new_tokens": 64},
                          "GRPO with small groups and short completions: 8 completions = 2 prompts × 4, "
                          "≤ 64 new tokens"),
    "smollm2": ({"min_tokens": 32, "max_tokens": 128, "grpo_prompts": 2, "generations": 4, "max_new_tokens": 64},
                "sizes that keep a 135M-parameter model's steps to seconds on one core: prompts and completions "
                "32–128 tokens, GRPO 8 completions = 2 prompts × 4, ≤ 64 new tokens"),
}


def apply_workload(parser, opts) -> None:
    """Fill the flags a --workload preset sets, unless given on the command line."""
    if not getattr(opts, "workload", None):
        return
    given = {a.split("=")[0].lstrip("-") for a in sys.argv[1:] if a.startswith("--")}
    for key, value in WORKLOADS[opts.workload][0].items():
        if key not in given:
            setattr(opts, key, value)


# ---- machine ceilings ---------------------------------------------------------------------------------------

def matmul_peak(dtype_name: str = "float32", size: int = 2048, runs: int = 20, device: str = "cpu") -> float:
    """Median FLOP/s of a size×size matmul (after 3 warm-ups) on `device`. On a GPU "tfloat32" is float32 with
    TF32 tensor cores allowed and "float32" without them; each product is synchronised before the clock stops."""
    import torch

    dtype = torch.float32 if dtype_name == "tfloat32" else getattr(torch, dtype_name)
    precision = torch.get_float32_matmul_precision()
    if device == "cuda":
        torch.set_float32_matmul_precision("high" if dtype_name == "tfloat32" else "highest")
    try:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(3):
            a @ b
        sync()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_float32_matmul_precision(precision)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * size ** 3 / statistics.median(times)


def measure_peaks(device: str) -> dict:
    """Median of 3 matmul-peak measurements per precision: fp32 (and bf16 where native) on a CPU at 2048²;
    bf16, tf32 and fp32 on a GPU at 8192²."""
    import torch

    from posttrain import hardware

    if device == "cuda":
        return {name: statistics.median(matmul_peak(name, GPU_MATMUL_SIZE, 10, "cuda") for _ in range(3))
                for name in ("bfloat16", "tfloat32", "float32")}
    peaks = {"float32": statistics.median(matmul_peak("float32") for _ in range(3))}
    if hardware.cpu_has_fast_bf16() or torch.cuda.is_available():
        peaks["bfloat16"] = statistics.median(matmul_peak("bfloat16") for _ in range(3))
    return peaks


def describe_machine(device: str, peaks: dict) -> dict:
    from posttrain import hardware

    if device != "cuda":  # the CPU entry as it always was
        return {"cpu": _cpu_model(), "native_bf16": hardware.cpu_has_fast_bf16(), "peaks": peaks}
    import torch

    name = torch.cuda.get_device_name()
    datasheet = next((v for key, v in DATASHEET_BF16 if key in name), None)
    return {"device": "cuda", "gpu": name, "cpu": _cpu_model(), "native_bf16": True, "peaks": peaks,
            "datasheet_bf16": datasheet, "torch_cuda": torch.version.cuda}


def model_params(name: str) -> dict:
    """Parameter counts of built-in model `name`, counted on the meta device (nothing allocated)."""
    import torch
    import transformers

    if name.startswith("posttrain/") and "llava" in name:  # a built-in VLM (vision tower + language model)
        from posttrain.models.vision import builtin_vlm_path

        config = transformers.AutoConfig.from_pretrained(builtin_vlm_path(name))
        auto = transformers.AutoModelForImageTextToText
    else:
        from compare_tasks import _model_path

        config = transformers.AutoConfig.from_pretrained(_model_path(name))
        auto = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", config)
    head = text.vocab_size * text.hidden_size
    return {"total": total, "head": head, "body": total - head}


def flops_per_token(task: str, params: dict) -> tuple[float, str]:
    """Model FLOPs per trained token (6N training, 2N per no-grad forward; attention FLOPs left out)."""
    n, body = params["total"], params["body"]
    if task.startswith(VISION_PREFIX):  # image tokens counted as tokens; the vision tower's FLOPs per image folded in
        flops, note = flops_per_token(task[len(VISION_PREFIX):], params)
        return flops, note + " (VLM: N includes the vision tower; approx.)"
    return {
        "sft": (6 * n, "6N"),
        "dpo": (8 * n, "6N policy + 2N reference"),
        "kto": (10 * n, "6N policy + 2N reference + 2N reference KL pass (approx.)"),
        "reward": (6 * body, "6N without the LM head (scalar head)"),
        "grpo": (8 * n, "6N training + 2N sampling (approx., beta=0: no reference)"),
        "grpo-tools": (8 * n, "6N training + 2N sampling, tool results included (approx., beta=0)"),
    }[task]


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_report(out: str, runs: dict, peaks: dict) -> None:
    import torch
    import transformers
    import trl

    import posttrain
    from posttrain import hardware

    tasks = [t for t in TASKS if t in runs]
    commands = {}
    for task in tasks:
        commands.setdefault(runs[task]["command"], []).append(task)
    here = {"cpu": _cpu_model(), "native_bf16": hardware.cpu_has_fast_bf16(), "peaks": peaks}
    machines = {task: runs[task].get("machine", here) for task in tasks}  # runs may come from different sessions
    loads = {task: runs[task].get("workload", DEFAULT_WORKLOAD) for task in tasks}
    params = {task: model_params(loads[task]["model"]) for task in tasks}
    gpu = any(m.get("device") == "cuda" for m in machines.values())

    def describe(machine: dict) -> str:
        if machine.get("device") == "cuda":
            datasheet = machine.get("datasheet_bf16")
            return (f"{machine['gpu']} (CUDA {machine.get('torch_cuda')}), peak matmul ({GPU_MATMUL_SIZE}², "
                    "median) " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in machine["peaks"].items())
                    + " TFLOP/s" + (f"; datasheet dense bf16 {datasheet / 1e12:.0f} TFLOP/s" if datasheet else ""))
        return (f"{machine['cpu']}, native bf16 {machine['native_bf16']}, peak matmul (2048², median) "
                + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in machine["peaks"].items()) + " GFLOP/s")

    def describe_load(load: dict, params: dict) -> str:
        if "vision" in load:
            return (f"Model {load['model']}: {params['total'] / 1e6:.1f}M parameters (vision tower included). "
                    f"{load['vision']}; {load['steps']} steps per run, median over steps 2–{load['steps']}; each run "
                    "a fresh process" + (" on the GPU" if load["device"] == "cuda" else "") + ".")
        grpo_prompts = load["grpo_batch"] // load["generations"]
        low, high = load["tokens"]
        steps = load["steps"]
        return (f"Model {load['model']}: {params['total'] / 1e6:.1f}M parameters ({params['head'] / 1e6:.1f}M in the "
                f"tied embedding/LM head). Batch {load['batch']} rows (GRPO {load['grpo_batch']} completions = "
                f"{grpo_prompts} prompts × {load['generations']}), prompts and completions {low}–{high} tokens "
                f"(GRPO: ≤{load['max_new_tokens']} new tokens), {steps} steps per run, median over steps 2–{steps} "
                "(and over repeats, which alternate variants); each run a fresh process"
                + (" on the GPU" if load["device"] == "cuda" else "") + ".")

    described: dict[str, list[str]] = {}
    for task in tasks:
        described.setdefault(describe_load(loads[task], params[task]), []).append(task)
    load_lines = [text if len(described) == 1 else f"{', '.join(t)}: {text}" for text, t in described.items()]

    lines = ["# Speed and memory: posttrain vs TRL vs a plain PyTorch loop", "",
             "Generated by " + "; ".join(f"`{c}` ({', '.join(t)}, {max(runs[x]['minutes'] for x in t):.0f} min, on "
                                         f"{describe(machines[t[0]])})" for c, t in commands.items()) + ".",
             "Runs made at different times may have run on different machines: compare ratios within a task, not "
             "seconds across tasks.",
             "",
             f"{os.cpu_count()} cores; torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, TRL {trl.__version__}, "
             f"posttrain {posttrain.__version__}.",
             *load_lines,
             "", "| task | variant | precision, grad. ckpt | s/step | tokens/s | vs TRL default | vs TRL best | "
             "vs plain loop | " + ("MFU (measured bf16 peak) | MFU (datasheet bf16) | " if gpu else
                                   "% of fp32 ceiling | ") +
             "peak memory (MiB) | memory vs TRL default | memory vs TRL best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for task in tasks:
        results = {(task, v): r for v, r in runs[task]["variants"].items()}
        flops, flops_note = flops_per_token(task, params[task])
        on_gpu = machines[task].get("device") == "cuda"
        peak_name = "bfloat16" if on_gpu else "float32"  # MFU on a GPU is taken against the bf16 tensor-core peak
        peak = machines[task]["peaks"][peak_name]
        ceiling = peak / flops
        datasheet = machines[task].get("datasheet_bf16")
        ref = {v: results.get((task, v)) for v in VARIANTS}
        bests = [v for v in ("trl-default", "trl-best-fp32", "trl-best-bf16") if ref.get(v)]
        best = max(bests, key=lambda v: _median(ref[v], "tokens_per_s")) if bests else None
        for variant in VARIANTS:
            measured = ref[variant]
            if not measured:
                continue
            tps, mem = _median(measured, "tokens_per_s"), _median(measured, "peak_mib")

            def ratio(other: str | None, key: str = "tokens_per_s", value: float = tps) -> str:
                return f"{value / _median(ref[other], key):.2f}×" if other and ref.get(other) else "–"

            precision = "bf16" if measured[0]["bf16"] else "fp32"
            precision += ", on" if measured[0]["gradient_checkpointing"] else ", off"
            sheet = (f"{100 * tps * flops / datasheet:.1f}% | " if datasheet else "– | ") if gpu else ""
            lines.append(f"| {task} | {variant} | {precision} | {_median(measured, 'seconds_per_step'):.3f} | {tps:.0f} | "
                         f"{ratio('trl-default')} | {ratio(best)} | {ratio('plain')} | "
                         + (f"{100 * tps / ceiling:.1f}% | " if gpu else f"{100 * tps / ceiling:.0f}% | ") + sheet +
                         f"{mem:.0f} | {ratio('trl-default', 'peak_mib', mem)} | "
                         f"{ratio(best, 'peak_mib', mem)} |")
        at = f"{peak / 1e12:.0f} TFLOP/s (measured bf16)" if on_gpu else f"{peak / 1e9:.0f} GFLOP/s"
        lines.append(f"| {task} | ceiling | {flops_note} at {at} | "
                     f"{_median(next(r for r in ref.values() if r), 'tokens_per_step') / ceiling:.3f} | {ceiling:.0f} "
                     "| | | | 100% | " + ((f"{100 * peak / datasheet:.0f}% | " if datasheet else "– | ")
                                          if gpu else "") + "| | |")
    lines += ["", "Tokens/s counts real (non-pad) prompt + completion tokens of every sequence trained on (DPO/reward: "
              "chosen and rejected, each with its prompt); the same rows for every variant, so tokens/s ratios are "
              "inverse s/step ratios. TRL best = the fastest TRL run of that task (defaults included: within noise the tuned settings do not always win). Peak "
              "memory = max RSS growth from just before the trainer (or plain loop) is built to the end of training: weights, reference copy, gradients, optimizer state and activations."]
    if gpu:
        lines += ["", "GPU runs: peak memory = torch.cuda.max_memory_allocated growth over the same span (the "
                  "allocator's reserve and the CUDA context left out; the reserve is in RESULTS.json as "
                  "peak_reserved_mib). MFU = the task's model FLOPs per token (ceiling row: 6N training, 2N per "
                  "no-grad forward, attention FLOPs left out; for SFT this is 6·N·tokens/s) × tokens/s ÷ the bf16 "
                  f"matmul peak measured in the same run ({GPU_MATMUL_SIZE}², random data, median); the datasheet "
                  "column divides by the vendor's dense (no sparsity) bf16 figure instead. posttrain and TRL run bf16 "
                  "mixed precision (fp32 weights and AdamW state), the plain loop bf16 autocast with fused AdamW."]
    kept = ""
    if os.path.exists(out):  # the hand-written part (techniques measured and what paid) survives a rerun
        with open(out) as f:
            text = f.read()
        if KEPT_SECTION in text:
            kept = "\n" + text[text.index(KEPT_SECTION):]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n" + kept)
    print("\n".join(lines))
    print(f"\nwrote {out}")
