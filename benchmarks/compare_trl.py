"""posttrain vs TRL vs a plain PyTorch loop, side by side in one run: tokens/s, seconds/step, peak memory.

    python benchmarks/compare_trl.py                        # all tasks, 2 alternating repeats → benchmarks/RESULTS.md
    python benchmarks/compare_trl.py --tasks sft dpo --repeats 1 --out /tmp/r.md
    python benchmarks/compare_trl.py --worker dpo posttrain  # one run in this process, prints one JSON line

Every run is a fresh process (so peak memory is that run's alone) and the same call form for both libraries —
`from posttrain import DPOTrainer` or `from trl import DPOTrainer`, the same config keys — on the same model, rows,
batch size, lengths and number of steps. Runs alternate (posttrain, TRL defaults, TRL best, plain loop, posttrain, …)
so machine noise hits them alike. Needs the `bench` extra (TRL).

Workload: the built-in `posttrain/tiny-15m` (Qwen2 shape, 12.9M params, 32k vocab: the LM head is most of the
FLOPs, as in real small models), random-length windows of the built-in arithmetic text as prompts and completions
(64–256 tokens each), batch 8 (GRPO: 16 completions = 2 prompts × 8 generations, 64–128 new tokens).

Variants:
  posttrain    posttrain with its defaults.
  posttrain-bf16  posttrain with bf16 autocast (only meaningful on CPUs with AMX/AVX512-BF16 and on GPUs).
  trl-default  TRL 1.16 with its defaults (bf16 autocast, gradient checkpointing on) plus use_cpu=True on a machine
               without a GPU (TRL stops at once without it).
  trl-best-*   TRL tuned for this machine: no gradient checkpointing, fp32 or bf16 (bf16 only where the hardware
               has it natively); "vs TRL best" compares with the fastest TRL run of the task, defaults included.
  plain        the same forward, backward and AdamW on the same padded batches in a hand-written loop (SFT, DPO,
               reward): what the hardware gives without a framework.
Ceiling: the model FLOPs per token (listed per task below) ÷ the measured peak fp32 matmul FLOP/s of this machine.

Measured per run: median seconds per optimizer step over the steps after the first (warm-up), real (non-pad)
tokens per step (prompt + completion of every sequence the task trains on; the same rows for every variant), and
peak RSS growth (max resident set during trainer construction and training minus the RSS just before, in MiB).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

MODEL = "posttrain/tiny-15m"
BATCH = 8
STEPS = 6
GRPO_GENERATIONS = 8
GRPO_BATCH = 16
TASKS = ("sft", "dpo", "grpo", "reward", "kto")
VARIANTS = ("posttrain", "posttrain-bf16", "trl-default", "trl-best-fp32", "trl-best-bf16", "plain")
BF16_VARIANTS = ("posttrain-bf16", "trl-best-bf16")  # run only where bf16 is native (AMX/AVX512-BF16, GPUs)
PLAIN_TASKS = ("sft", "dpo", "reward")
HERE = os.path.dirname(os.path.abspath(__file__))
KEPT_SECTION = "## Techniques"


# ---- data ---------------------------------------------------------------------------------------------------

def _windows(tokenizer, n: int, seed: int, low: int = 64, high: int = 256) -> list[tuple[str, str, str]]:
    """n (prompt, completion_a, completion_b) triples cut from the built-in arithmetic text, 64–256 tokens each."""
    from posttrain.data.arith import load_builtin_dataset

    text = "\n\n".join(load_builtin_dataset("posttrain/arith-lm", split="train")["text"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lengths = [rng.randint(low, high) for _ in range(3)]
        start = rng.randint(0, len(ids) - sum(lengths) - 1)
        pieces, at = [], start
        for length in lengths:
            pieces.append(tokenizer.decode(ids[at:at + length]))
            at += length
        out.append(tuple(pieces))
    return out


def build_dataset(task: str, tokenizer):
    import datasets

    rows = BATCH * STEPS
    if task == "grpo":
        rows = GRPO_BATCH // GRPO_GENERATIONS * STEPS
    triples = _windows(tokenizer, rows, seed=0)
    if task == "sft":
        data = {"prompt": [p for p, _, _ in triples], "completion": [a for _, a, _ in triples]}
    elif task in ("dpo", "reward"):
        data = {"prompt": [p for p, _, _ in triples], "chosen": [a for _, a, _ in triples],
                "rejected": [b for _, _, b in triples]}
    elif task == "kto":
        data = {"prompt": [p for p, _, _ in triples], "completion": [a for _, a, _ in triples],
                "label": [i % 2 == 0 for i in range(rows)]}
    else:
        data = {"prompt": [p for p, _, _ in triples]}
    return datasets.Dataset.from_dict(data)


def tokens_per_step(task: str, tokenizer, dataset) -> float:
    """Real tokens one optimizer step trains on, averaged over the run (every variant sees the same rows)."""
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    if task == "sft" or task == "kto":
        total = sum(n(p) + n(c) - 1 for p, c in zip(dataset["prompt"], dataset["completion"]))
        return total / STEPS
    if task in ("dpo", "reward"):
        total = sum(2 * n(p) + n(c) + n(r) - 2 for p, c, r in
                    zip(dataset["prompt"], dataset["chosen"], dataset["rejected"]))
        return total / STEPS
    return None  # grpo: counted from the run (completion lengths vary)


# ---- one run ------------------------------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _digit_share_reward(completions, **kwargs):
    """A cheap, deterministic reward (same for both libraries): share of digit characters."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def _config_kwargs(task: str, variant: str, out: str) -> dict:
    kw = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-5,
              report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
              dataloader_num_workers=0)
    if task in ("sft", "dpo", "reward", "kto"):
        kw["max_length"] = 1024
    if task == "grpo":
        kw.update(per_device_train_batch_size=GRPO_BATCH, num_generations=GRPO_GENERATIONS,
                  max_completion_length=128)
    if variant.startswith("trl"):
        import torch

        # TRL's default bf16=True stops a CPU-only run at once ("Your setup doesn't support bf16/gpu. You need to
        # assign use_cpu"): use_cpu=True is the one flag a CPU user must add.
        kw["use_cpu"] = not torch.cuda.is_available()
    if variant.startswith("trl-best"):
        kw.update(gradient_checkpointing=False, bf16=variant.endswith("bf16"))
    if variant == "posttrain-bf16":
        kw["bf16"] = True
    return kw


def run_library(task: str, variant: str) -> dict:
    import torch
    import transformers

    if variant.startswith("posttrain"):
        import posttrain as lib
    else:
        import trl as lib
    from posttrain.models.builtin import builtin_model_path

    model_path = builtin_model_path(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    dataset = build_dataset(task, tokenizer)
    per_step = tokens_per_step(task, tokenizer, dataset)
    names = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO", "reward": "Reward", "kto": "KTO"}
    config_cls = getattr(lib, names[task] + "Config")
    trainer_cls = getattr(lib, names[task] + "Trainer")
    args = config_cls(**_config_kwargs(task, variant, f"/tmp/bench-{task}-{variant}"))

    step_times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t)

    before = _rss_mib()
    model = model_path
    if task == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    kwargs = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    if task == "grpo":
        kwargs["reward_funcs"] = _digit_share_reward
    trainer = trainer_cls(**kwargs)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if per_step is None:  # grpo: prompt + completion tokens actually trained, from the logged lengths
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in dataset["prompt"])
        per_step = GRPO_BATCH * (prompt_tokens + statistics.mean(lengths))
    timed = step_times[1:] or step_times
    seconds = statistics.median(timed)
    return {"task": task, "variant": variant, "seconds_per_step": seconds, "tokens_per_step": per_step,
            "tokens_per_s": per_step / seconds, "peak_mib": peak - before, "wall_s": wall,
            "steps": len(step_times), "threads": torch.get_num_threads(),
            "bf16": bool(getattr(args, "bf16", False)),
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
            "first_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)}


def run_plain(task: str) -> dict:
    """The same rows in the same order, padded, through a hand-written forward/backward/AdamW loop (fp32)."""
    import torch
    import torch.nn.functional as F
    import transformers

    from posttrain.models.builtin import builtin_model_path

    torch.manual_seed(0)
    model_path = builtin_model_path(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    dataset = build_dataset(task, tokenizer)
    per_step = tokens_per_step(task, tokenizer, dataset)
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def pad(seqs: list[list[int]], labels: list[list[int]]):
        width = max(map(len, seqs))
        x = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        y = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        m = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return x, y, m

    def seq_logps(model, x, y, m):
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        targets = y[:, 1:]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (targets != -100)).sum(-1)

    before = _rss_mib()
    if task == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    ref = None
    if task == "dpo":
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = list(dataset)
    step_times = []
    for step in range(STEPS):
        batch = rows[step * BATCH:(step + 1) * BATCH]
        t = time.perf_counter()
        if task == "sft":
            seqs, labels = [], []
            for r in batch:
                p, c = ids(r["prompt"]), ids(r["completion"]) + [eos]
                seqs.append(p + c)
                labels.append([-100] * len(p) + c)
            x, y, m = pad(seqs, labels)
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
        else:
            seqs, labels = [], []
            for key in ("chosen", "rejected"):
                for r in batch:
                    p, c = ids(r["prompt"]), ids(r[key]) + [eos]
                    seqs.append(p + c)
                    labels.append([-100] * len(p) + c)
            x, y, m = pad(seqs, labels)
            if task == "reward":
                scores = model(input_ids=x, attention_mask=m).logits.squeeze(-1)
                loss = -F.logsigmoid(scores[:BATCH] - scores[BATCH:]).mean()
            else:
                policy = seq_logps(model, x, y, m)
                with torch.no_grad():
                    reference = seq_logps(ref, x, y, m)
                ratio = (policy - reference)
                loss = -F.logsigmoid(0.1 * (ratio[:BATCH] - ratio[BATCH:])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = statistics.median(step_times[1:])
    return {"task": task, "variant": "plain", "seconds_per_step": seconds, "tokens_per_step": per_step,
            "tokens_per_s": per_step / seconds, "peak_mib": peak - before, "steps": STEPS,
            "threads": torch.get_num_threads(), "bf16": False, "gradient_checkpointing": False}


# ---- machine ceilings ---------------------------------------------------------------------------------------

def matmul_peak(dtype_name: str = "float32", size: int = 2048, runs: int = 20) -> float:
    """Median FLOP/s of a size×size matmul (after 3 warm-ups)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / statistics.median(times)


def model_params() -> dict:
    import transformers

    from posttrain.models.builtin import builtin_model_path

    config = transformers.AutoConfig.from_pretrained(builtin_model_path(MODEL))
    model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    head = config.vocab_size * config.hidden_size
    return {"total": total, "head": head, "body": total - head}


def flops_per_token(task: str, params: dict) -> tuple[float, str]:
    """Model FLOPs per trained token (6N training, 2N per no-grad forward; attention FLOPs left out)."""
    n, body = params["total"], params["body"]
    return {
        "sft": (6 * n, "6N"),
        "dpo": (8 * n, "6N policy + 2N reference"),
        "kto": (10 * n, "6N policy + 2N reference + 2N reference KL pass (approx.)"),
        "reward": (6 * body, "6N without the LM head (scalar head)"),
        "grpo": (8 * n, "6N training + 2N sampling (approx., beta=0: no reference)"),
    }[task]


# ---- orchestration ------------------------------------------------------------------------------------------

def worker(task: str, variant: str) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result = run_plain(task) if variant == "plain" else run_library(task, variant)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(task: str, variant: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", task, variant]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"  {task}/{variant} failed: {' | '.join(tail)}", flush=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--fresh", action="store_true", help="Forget figures of tasks not run this time "
                        "(by default they are kept from OUT's .json and the report covers every task run so far).")
    parser.add_argument("--report_only", action="store_true", help="Rewrite OUT from OUT's .json without running.")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(*opts.worker)
        return

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from posttrain import hardware

    if opts.report_only:
        with open(os.path.splitext(opts.out)[0] + ".json") as f:
            stored = json.load(f)
        write_report(opts.out, stored["tasks"], stored["peaks"], model_params())
        return
    peaks = {"float32": statistics.median(matmul_peak("float32") for _ in range(3))}
    if hardware.cpu_has_fast_bf16() or torch.cuda.is_available():
        peaks["bfloat16"] = statistics.median(matmul_peak("bfloat16") for _ in range(3))
    print("peak matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()), flush=True)
    params = model_params()
    results: dict[tuple[str, str], list[dict]] = {}
    started = time.time()
    for repeat in range(opts.repeats):
        for task in opts.tasks:
            for variant in opts.variants:
                if variant == "plain" and task not in PLAIN_TASKS:
                    continue
                if variant in BF16_VARIANTS and "bfloat16" not in peaks:
                    continue
                result = spawn(task, variant)
                if result:
                    results.setdefault((task, variant), []).append(result)
                    print(f"repeat {repeat}: {task:6s} {variant:11s} {result['seconds_per_step']:.3f} s/step "
                          f"{result['tokens_per_s']:.0f} tok/s peak +{result['peak_mib']:.0f} MiB", flush=True)
    command = f"python benchmarks/compare_trl.py {' '.join(sys.argv[1:])}".rstrip()
    machine = {"cpu": _cpu_model(), "native_bf16": hardware.cpu_has_fast_bf16(), "peaks": peaks}
    runs = {task: {"command": command, "minutes": round((time.time() - started) / 60, 1), "machine": machine,
                   "variants": {v: r for (t, v), r in results.items() if t == task}} for task in opts.tasks}
    store = os.path.splitext(opts.out)[0] + ".json"
    if os.path.exists(store) and not opts.fresh:  # keep the other tasks' figures from earlier invocations
        with open(store) as f:
            runs = {**json.load(f)["tasks"], **runs}
    with open(store, "w") as f:
        json.dump({"tasks": runs, "peaks": peaks}, f, indent=1)
    write_report(opts.out, runs, peaks, params)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_report(out: str, runs: dict, peaks: dict, params: dict) -> None:
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

    def describe(machine: dict) -> str:
        return (f"{machine['cpu']}, native bf16 {machine['native_bf16']}, peak matmul (2048², median) "
                + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in machine["peaks"].items()) + " GFLOP/s")

    lines = ["# Speed and memory: posttrain vs TRL vs a plain PyTorch loop", "",
             "Generated by " + "; ".join(f"`{c}` ({', '.join(t)}, {max(runs[x]['minutes'] for x in t):.0f} min, on "
                                         f"{describe(machines[t[0]])})" for c, t in commands.items()) + ".",
             "Runs made at different times may have run on different machines: compare ratios within a task, not "
             "seconds across tasks.",
             "",
             f"{os.cpu_count()} cores; torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, TRL {trl.__version__}, "
             f"posttrain {posttrain.__version__}.",
             f"Model {MODEL}: {params['total'] / 1e6:.1f}M parameters ({params['head'] / 1e6:.1f}M in the tied "
             f"embedding/LM head). Batch {BATCH} rows (GRPO {GRPO_BATCH} completions = "
             f"{GRPO_BATCH // GRPO_GENERATIONS} prompts × {GRPO_GENERATIONS}), prompts and completions 64–256 tokens "
             f"(GRPO: ≤128 new tokens), {STEPS} steps per run, median over steps 2–{STEPS} (and over repeats, which "
             "alternate variants); each run a fresh process.",
             "", "| task | variant | precision, grad. ckpt | s/step | tokens/s | vs TRL default | vs TRL best | "
             "vs plain loop | % of fp32 ceiling | peak memory (MiB) | memory vs TRL default | memory vs TRL best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        results = {(task, v): r for v, r in runs[task]["variants"].items()}
        flops, flops_note = flops_per_token(task, params)
        fp32_peak = machines[task]["peaks"]["float32"]
        ceiling = fp32_peak / flops
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
            lines.append(f"| {task} | {variant} | {precision} | {_median(measured, 'seconds_per_step'):.3f} | {tps:.0f} | "
                         f"{ratio('trl-default')} | {ratio(best)} | {ratio('plain')} | "
                         f"{100 * tps / ceiling:.0f}% | {mem:.0f} | {ratio('trl-default', 'peak_mib', mem)} | "
                         f"{ratio(best, 'peak_mib', mem)} |")
        lines.append(f"| {task} | ceiling | {flops_note} at {fp32_peak / 1e9:.0f} GFLOP/s | "
                     f"{_median(next(r for r in ref.values() if r), 'tokens_per_step') / ceiling:.3f} | {ceiling:.0f} "
                     "| | | | 100% | | | |")
    lines += ["", "Tokens/s counts real (non-pad) prompt + completion tokens of every sequence trained on (DPO/reward: "
              "chosen and rejected, each with its prompt); the same rows for every variant, so tokens/s ratios are "
              "inverse s/step ratios. TRL best = the fastest TRL run of that task (defaults included: within noise the tuned settings do not always win). Peak "
              "memory = max RSS growth from just before the trainer (or plain loop) is built to the end of training: weights, reference copy, gradients, optimizer state and activations."]
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


if __name__ == "__main__":
    main()
