"""posttrain vs TRL vs a plain PyTorch loop, side by side in one run: tokens/s, seconds/step, peak memory.

    python benchmarks/compare_trl.py                        # all tasks, 2 alternating repeats → benchmarks/RESULTS.md
    python benchmarks/compare_trl.py --tasks sft dpo --repeats 1 --out /tmp/r.md
    python benchmarks/compare_trl.py --worker dpo posttrain  # one run in this process, prints one JSON line
    python benchmarks/compare_trl.py --device cuda --model posttrain/shape-qwen2-0.5b --batch 16 \
        --min_tokens 128 --max_tokens 384 --grpo_prompts 4 --out /tmp/RESULTS-gpu.md   # a GPU (benchmarks/gpu_run.sh)
    taskset -c 0 python benchmarks/compare_trl.py --model posttrain/smollm2-135m-instruct --workload smollm2 \
        --threads 1 --out benchmarks/RESULTS-smollm2.md      # the real model (benchmarks/RESULTS-smollm2.md)
    python benchmarks/compare_trl.py --tasks grpo --model posttrain/tiny-15m --workload grpo-small-groups
    python benchmarks/compare_trl.py --tasks vision-sft vision-dpo vision-grpo --out /tmp/r-vision.md  # VLM rows

`--model` takes the built-in models and the packaged real one (`posttrain/smollm2-135m-instruct`, SmolLM2-135M-
Instruct: TRL gets its converted checkpoint directory). `--workload NAME` fills the workload flags from a preset
(flags given explicitly still win): `smollm2` (prompts and completions 32–128 tokens, GRPO 2 prompts × 4
completions of ≤ 64 tokens: a 135M model's steps stay at seconds on one core) and `grpo-small-groups` (GRPO with
4 completions per prompt, ≤ 64 new tokens, 8 completions per step).

Every run is a fresh process (so peak memory is that run's alone) and the same call form for both libraries —
`from posttrain import DPOTrainer` or `from trl import DPOTrainer`, the same config keys — on the same model, rows,
batch size, lengths and number of steps. Runs alternate (posttrain, TRL defaults, TRL best, plain loop, posttrain, …)
so machine noise hits them alike. Needs the `bench` extra (TRL).

Workload: the built-in `posttrain/tiny-15m` (Qwen2 shape, 12.9M params, 32k vocab: the LM head is most of the
FLOPs, as in real small models), random-length windows of the built-in arithmetic text as prompts and completions
(64–256 tokens each), batch 8 (GRPO: 16 completions = 2 prompts × 8 generations, 64–128 new tokens).

Vision tasks (`vision-sft`, `vision-dpo`, `vision-grpo`): the same trainers on the built-in VLM posttrain/tiny-llava
with image rows, the workload of `vision_speed.py` (imported from there: `vision_setup`): SFT 16 rows, DPO 8 pairs,
GRPO 4 prompts × 8 completions of ≤ 8 tokens per step, one 32×32 image (16 image tokens) per row. They ignore
--model, --batch and the token-window flags; tokens per step = the run's logged num_tokens ÷ steps (both libraries
count the real prompt + completion tokens, image tokens included); no plain loop.

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

On a GPU (`--device cuda`, or `auto` where one is visible) models and the plain loop run there; TRL and posttrain run
with bf16 (TRL's default; posttrain's default on a bf16 GPU; the plain loop under bf16 autocast with fused AdamW);
the variants that only make sense on a CPU (posttrain-bf16 = posttrain's default there, trl-best-fp32) are left out
unless named in --variants; the matmul peak is measured on the GPU (8192², bf16, tf32 and fp32); the % column
becomes MFU = model FLOPs per token × tokens/s ÷ the measured bf16 peak, next to the same over the vendor's dense
bf16 datasheet figure; peak memory is torch.cuda.max_memory_allocated growth. `--model posttrain/shape-qwen2-0.5b`
is Qwen2-0.5B's shape (494M parameters, vocab 151,936) with random weights, built locally by
`posttrain.models.builtin` like the tiny models (nothing is downloaded; the shipped tokenizer uses its first 4,096
rows).

Measured per run: median seconds per optimizer step over the steps after the first (warm-up), real (non-pad)
tokens per step (prompt + completion of every sequence the task trains on; the same rows for every variant), and
peak RSS growth (max resident set during trainer construction and training minus the RSS just before, in MiB;
on a GPU, peak allocated GPU memory growth over the same span).
Not a test: nothing here asserts a speed. Not here: the workload constants, the task rows and configs
(`compare_tasks.py`); the matmul ceilings, FLOPs per token and the report (`compare_report.py`).
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

import compare_tasks as setup
from compare_report import (
    TASKS,
    VARIANTS,
    VISION_PREFIX,
    WORKLOADS,
    apply_workload,
    describe_machine,
    measure_peaks,
    write_report,
)

BF16_VARIANTS = ("posttrain-bf16", "trl-best-bf16")  # run only where bf16 is native (AMX/AVX512-BF16, GPUs)
PLAIN_TASKS = ("sft", "dpo", "reward")
CPU_ONLY_VARIANTS = ("posttrain-bf16", "trl-best-fp32")  # on a GPU: posttrain's default is bf16; fp32 is not TRL's best
HERE = os.path.dirname(os.path.abspath(__file__))



def _sync() -> None:
    if setup.DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory_mark() -> float:
    """Where peak-memory growth is measured from: RSS (CPU), or allocated GPU memory with the peak counter reset."""
    if setup.DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return _rss_mib()


def _memory_peak() -> float:
    if setup.DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one run ------------------------------------------------------------------------------------------------

_START = time.perf_counter()


def _mark(what: str) -> None:
    """A progress line on stdout (seconds since the worker started): a run cut off by --run_timeout shows how far it
    got (imports, data, trainer, each step's seconds) instead of nothing."""
    print(f"MARK {time.perf_counter() - _START:.1f}s {what}", flush=True)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_library(task: str, variant: str) -> dict:
    import torch
    import transformers

    if variant.startswith("posttrain"):
        import posttrain as lib
    else:
        import trl as lib
    vision = None
    if task.startswith(VISION_PREFIX):  # the VLM workload of vision_speed.py: its model, processor, image rows
        from vision_speed import load_vlm, vision_setup

        vision = vision_setup(task[len(VISION_PREFIX):], setup.STEPS)
        tokenizer, dataset, per_step = vision["processor"], vision["data"], None  # tokens: the run's num_tokens
    else:
        model_path = setup._model_path(setup.MODEL)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        dataset = setup.build_dataset(task, tokenizer)
        per_step = setup.tokens_per_step(task, tokenizer, dataset)
    names = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO", "reward": "Reward", "kto": "KTO", setup.TOOLS_TASK: "GRPO"}
    name = names[task.removeprefix(VISION_PREFIX)]
    config_cls = getattr(lib, name + "Config")
    trainer_cls = getattr(lib, name + "Trainer")
    kw = setup._config_kwargs(task, variant, f"/tmp/bench-{task}-{variant}")
    if vision:
        kw.update(vision["config"])
    args = config_cls(**kw)

    step_times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            step_times.append(time.perf_counter() - self.t)
            _mark(f"step {len(step_times)} took {step_times[-1]:.2f} s")

    before = _memory_mark()
    model = load_vlm(vision["path"]) if vision else model_path
    if task == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    kwargs = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    if task in ("grpo", setup.TOOLS_TASK):
        kwargs["reward_funcs"] = setup._digit_share_reward
    if task == setup.TOOLS_TASK:
        tokenizer.chat_template = setup.tools_chat_template()
        kwargs["tools"] = [setup.calculator_tool()]
    kwargs.update(vision["extra"] if vision else {})
    _mark("data ready; building the trainer")
    trainer = trainer_cls(**kwargs)
    _mark("trainer built; training")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = _memory_peak()
    if vision or task == setup.TOOLS_TASK:  # both libraries log the real tokens of the batch (images, tool results)
        per_step = max(h.get("num_tokens", 0) for h in trainer.state.log_history) / setup.STEPS
    elif per_step is None:  # grpo: prompt + completion tokens actually trained, from the logged lengths
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in dataset["prompt"])
        per_step = setup.GRPO_BATCH * (prompt_tokens + statistics.mean(lengths))
    timed = step_times[1:] or step_times
    seconds = statistics.median(timed)
    return {"task": task, "variant": variant, "seconds_per_step": seconds, "tokens_per_step": per_step,
            "tokens_per_s": per_step / seconds, "peak_mib": peak - before, "wall_s": wall,
            "steps": len(step_times), "threads": torch.get_num_threads(),
            "bf16": bool(getattr(args, "bf16", False)),
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
            "first_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None),
            **_tool_fields(trainer.state.log_history),
            **_device_fields(trainer.model)}


def _tool_fields(history: list[dict]) -> dict:
    """grpo-tools: tool calls per completion and failed calls per call, averaged over the logged steps (both libraries
    log these two names)."""
    fields = {}
    for key in ("tools/call_frequency", "tools/failure_frequency"):
        values = [h[key] for h in history if key in h]
        if values:
            fields[key] = statistics.mean(values)
    return fields


def _device_fields(model) -> dict:
    """On a GPU: where the model ran and the allocator's reserve (the CPU results stay as they were)."""
    if setup.DEVICE != "cuda":
        return {}
    import torch

    return {"device": str(next(model.parameters()).device),
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def run_plain(task: str) -> dict:
    """The same rows in the same order, padded, through a hand-written forward/backward/AdamW loop (fp32 on a CPU;
    on a GPU bf16 autocast, fused AdamW, batches built and copied to the GPU before the clock starts)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(0)
    model_path = setup._model_path(setup.MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    dataset = setup.build_dataset(task, tokenizer)
    per_step = setup.tokens_per_step(task, tokenizer, dataset)
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def pad(seqs: list[list[int]], labels: list[list[int]]):
        width = max(map(len, seqs))
        x = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        y = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        m = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return x, y, m

    gpu = setup.DEVICE == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    def seq_logps(model, x, y, m):
        with autocast():
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        targets = y[:, 1:]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (targets != -100)).sum(-1)

    before = _memory_mark()
    if task == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    ref = None
    if task == "dpo":
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
    if gpu:
        model.to(setup.DEVICE)
        if ref is not None:
            ref.to(setup.DEVICE)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if gpu else {}))
    rows = list(dataset)

    def make_batch(step: int):
        batch = rows[step * setup.BATCH:(step + 1) * setup.BATCH]
        seqs, labels = [], []
        for key in (("completion",) if task == "sft" else ("chosen", "rejected")):
            for r in batch:
                p, c = ids(r["prompt"]), ids(r[key]) + [eos]
                seqs.append(p + c)
                labels.append([-100] * len(p) + c)
        return pad(seqs, labels)

    ready = [tuple(t.to(setup.DEVICE) for t in make_batch(step)) for step in range(setup.STEPS)] if gpu else None
    step_times = []
    for step in range(setup.STEPS):
        _sync()
        t = time.perf_counter()
        x, y, m = ready[step] if gpu else make_batch(step)
        if task == "sft":
            with autocast():
                loss = model(input_ids=x, attention_mask=m, labels=y).loss
        elif task == "reward":
            with autocast():
                scores = model(input_ids=x, attention_mask=m).logits.squeeze(-1)
            loss = -F.logsigmoid((scores[:setup.BATCH] - scores[setup.BATCH:]).float()).mean()
        else:
            policy = seq_logps(model, x, y, m)
            with torch.no_grad():
                reference = seq_logps(ref, x, y, m)
            ratio = (policy - reference)
            loss = -F.logsigmoid(0.1 * (ratio[:setup.BATCH] - ratio[setup.BATCH:])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        step_times.append(time.perf_counter() - t)
        _mark(f"step {len(step_times)} took {step_times[-1]:.2f} s")
    peak = _memory_peak()
    seconds = statistics.median(step_times[1:])
    return {"task": task, "variant": "plain", "seconds_per_step": seconds, "tokens_per_step": per_step,
            "tokens_per_s": per_step / seconds, "peak_mib": peak - before, "steps": setup.STEPS,
            "threads": torch.get_num_threads(), "bf16": gpu, "gradient_checkpointing": False,
            **_device_fields(model)}


# ---- orchestration ------------------------------------------------------------------------------------------

def worker(task: str, variant: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _mark("imports done")
    result = run_plain(task) if variant == "plain" else run_library(task, variant)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(task: str, variant: str, args: list[str] = (), timeout: float | None = None,
          fail_lines: int = 3) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", task, variant, *args]
    sep = " | " if fail_lines <= 3 else "\n    "  # a long traceback tail reads better line by line
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def text(stream):
            return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")

        tail = text(e.stderr).strip().splitlines()[-fail_lines:]
        marks = [line[5:] for line in text(e.stdout).splitlines() if line.startswith("MARK ")]
        print(f"  {task}/{variant} stopped after {timeout:.0f} s (--run_timeout); got to: "
              f"{'; '.join(marks[-8:]) or 'no mark (still importing)'}; stderr: {sep.join(tail)}", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-fail_lines:]
    if proc.returncode < 0:  # SIGKILL leaves no traceback: most often the kernel's OOM killer
        marks = [line[5:] for line in proc.stdout.splitlines() if line.startswith("MARK ")]
        tail = [f"killed by signal {-proc.returncode} (9: most often out of memory) after: "
                f"{'; '.join(marks[-4:]) or 'no mark'}"]
    print(f"  {task}/{variant} failed: {sep.join(tail)}", flush=True)
    return None


def main() -> None:
    from posttrain.models.builtin import BUILTIN_MODELS, SHAPED_MODELS
    from posttrain.models.packaged import PACKAGED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="Default: all on a CPU; on a GPU all but " + ", ".join(CPU_ONLY_VARIANTS) + ".")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="Where models, the plain loop and the matmul peak run (auto: cuda when torch sees one).")
    names = list(BUILTIN_MODELS) + list(SHAPED_MODELS) + list(PACKAGED_MODELS)

    def model_arg(value: str) -> str:
        if value in names or os.path.isfile(os.path.join(value, "config.json")):
            return value
        raise argparse.ArgumentTypeError(f"{value!r} is neither one of {', '.join(names)} nor a model directory")

    parser.add_argument("--model", default=setup.MODEL, type=model_arg,
                        help="A built-in model (random weights, built locally; posttrain/shape-qwen2-0.5b is "
                        "Qwen2-0.5B's shape), a packaged real one (posttrain/smollm2-135m-instruct) or a saved model "
                        "directory (e.g. a tool-use SFT model for grpo-tools).")
    parser.add_argument("--workload", choices=sorted(WORKLOADS),
                        help="A preset of the workload flags (flags given explicitly still win): "
                        + "; ".join(f"{k}: {v[1]}" for k, v in sorted(WORKLOADS.items())) + ".")
    parser.add_argument("--batch", type=int, default=setup.BATCH, help="Rows per step (SFT, DPO, reward, KTO).")
    parser.add_argument("--steps", type=int, default=setup.STEPS,
                        help="Optimizer steps per run (the first is warm-up).")
    parser.add_argument("--min_tokens", type=int, default=setup.MIN_TOKENS,
                        help="Shortest prompt / completion window.")
    parser.add_argument("--max_tokens", type=int, default=setup.MAX_TOKENS, help="Longest prompt / completion window.")
    parser.add_argument("--grpo_prompts", type=int, default=setup.GRPO_BATCH // setup.GRPO_GENERATIONS,
                        help="GRPO prompts per step (each sampled --generations times).")
    parser.add_argument("--generations", type=int, default=setup.GRPO_GENERATIONS)
    parser.add_argument("--max_new_tokens", type=int, default=setup.MAX_NEW_TOKENS,
                        help="GRPO completion length cap.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads in every process (default: all cores).")
    parser.add_argument("--run_timeout", type=float, default=None,
                        help="Seconds before one run (one process) is stopped and reported as failed.")
    parser.add_argument("--fail_lines", type=int, default=3, help="Lines of a failed run's stderr to print.")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--fresh", action="store_true", help="Forget figures of tasks not run this time "
                        "(by default they are kept from OUT's .json and the report covers every task run so far).")
    parser.add_argument("--report_only", action="store_true", help="Rewrite OUT from OUT's .json without running.")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    apply_workload(parser, opts)
    if opts.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up and not timed)")
    setup.configure(opts)
    if opts.worker:
        worker(*opts.worker, opts.threads)
        return

    import torch

    torch.set_num_threads(opts.threads)

    if opts.report_only:
        with open(os.path.splitext(opts.out)[0] + ".json") as f:
            stored = json.load(f)
        write_report(opts.out, stored["tasks"], stored["peaks"])
        return
    peaks = measure_peaks(setup.DEVICE)
    unit, scale = ("TFLOP/s", 1e12) if setup.DEVICE == "cuda" else ("GFLOP/s", 1e9)
    print(f"peak matmul {unit}: " + ", ".join(f"{k} {v / scale:.0f}" for k, v in peaks.items()), flush=True)
    variants = opts.variants or [v for v in VARIANTS if setup.DEVICE == "cpu" or v not in CPU_ONLY_VARIANTS]
    results: dict[tuple[str, str], list[dict]] = {}
    started = time.time()
    command = f"python benchmarks/compare_trl.py {' '.join(sys.argv[1:])}".rstrip()
    if os.environ.get("POSTTRAIN_BENCH_OPTIONS"):  # the A/B options of posttrain's runs belong to the command
        command = f"POSTTRAIN_BENCH_OPTIONS='{os.environ['POSTTRAIN_BENCH_OPTIONS']}' {command}"
    machine = describe_machine(setup.DEVICE, peaks)
    store = os.path.splitext(opts.out)[0] + ".json"
    stored = {}
    if os.path.exists(store) and not opts.fresh:  # keep the other tasks' figures from earlier invocations
        with open(store) as f:
            stored = json.load(f)["tasks"]

    def save(tasks) -> dict:
        runs = {task: {"command": command, "minutes": round((time.time() - started) / 60, 1), "machine": machine,
                       "variants": {v: r for (t, v), r in results.items() if t == task}} for task in tasks}
        for task, run in runs.items():
            run["workload"] = setup.workload(task)
        runs = {**stored, **runs}
        with open(store, "w") as f:
            json.dump({"tasks": runs, "peaks": peaks}, f, indent=1)
        return runs

    for repeat in range(opts.repeats):
        for task in opts.tasks:
            for variant in variants:
                if variant == "plain" and task not in PLAIN_TASKS:
                    continue
                if variant in BF16_VARIANTS and "bfloat16" not in peaks:
                    continue
                result = spawn(task, variant, setup.workload_args(opts), opts.run_timeout, opts.fail_lines)
                if result:
                    results.setdefault((task, variant), []).append(result)
                    print(f"repeat {repeat}: {task:6s} {variant:11s} {result['seconds_per_step']:.3f} s/step "
                          f"{result['tokens_per_s']:.0f} tok/s peak +{result['peak_mib']:.0f} MiB", flush=True)
                    save(sorted({t for t, _ in results}, key=TASKS.index))  # partial results survive a kill
    runs = save(opts.tasks)
    write_report(opts.out, runs, peaks)


if __name__ == "__main__":
    main()
