"""The task setups of `compare_trl.py`: the workload constants (set from its flags by `configure`), the rows each
task trains on (random-length windows of the built-in arithmetic text), the real tokens a step trains on, the
GRPO reward and every variant's config keyword arguments (the workload in words: `compare_trl.py`'s docstring;
the vision tasks': `vision_speed.py`). `profile_step.py` builds its runs from these too.

Not here: running and measuring the variants (`compare_trl.py`), the report (`compare_report.py`).
"""

from __future__ import annotations

import json
import os
import random
import shutil

from compare_report import VISION_PREFIX

MODEL = "posttrain/tiny-15m"
BATCH = 8
STEPS = 6
GRPO_GENERATIONS = 8
GRPO_BATCH = 16
MIN_TOKENS, MAX_TOKENS = 64, 256  # prompt and completion windows
MAX_NEW_TOKENS = 128  # GRPO completions
DEVICE = "cpu"  # set by configure(): "cpu" or "cuda"


def workload_args(opts) -> list[str]:
    """The flags that fix the workload, as a worker's command line takes them."""
    return ["--device", opts.device, "--model", opts.model, "--batch", str(opts.batch), "--steps", str(opts.steps),
            "--min_tokens", str(opts.min_tokens), "--max_tokens", str(opts.max_tokens),
            "--grpo_prompts", str(opts.grpo_prompts), "--generations", str(opts.generations),
            "--max_new_tokens", str(opts.max_new_tokens), "--threads", str(opts.threads)]


def configure(opts) -> None:
    """Set the module's workload constants from the command line (the defaults leave them as written above)."""
    global MODEL, BATCH, STEPS, GRPO_GENERATIONS, GRPO_BATCH, MIN_TOKENS, MAX_TOKENS, MAX_NEW_TOKENS, DEVICE
    import torch

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    MODEL, BATCH, STEPS, DEVICE = opts.model, opts.batch, opts.steps, opts.device
    GRPO_GENERATIONS, GRPO_BATCH = opts.generations, opts.grpo_prompts * opts.generations
    MIN_TOKENS, MAX_TOKENS, MAX_NEW_TOKENS = opts.min_tokens, opts.max_tokens, opts.max_new_tokens


def workload(task: str = "") -> dict:
    """What a task's figures were measured on (kept per task in RESULTS.json)."""
    if task.startswith(VISION_PREFIX):
        from vision_speed import VISION_MODEL, VISION_WORKLOAD

        return {"model": VISION_MODEL, "device": DEVICE, "steps": STEPS, "vision": VISION_WORKLOAD}
    return {"model": MODEL, "device": DEVICE, "batch": BATCH, "steps": STEPS, "tokens": [MIN_TOKENS, MAX_TOKENS],
            "grpo_batch": GRPO_BATCH, "generations": GRPO_GENERATIONS, "max_new_tokens": MAX_NEW_TOKENS}


def _model_path(name: str) -> str:
    """The local directory of a built-in, benchmark-shape or packaged model (TRL takes paths, not posttrain's names;
    the shapes of `SHAPED_MODELS` are benchmark-only, so the library's own name resolution refuses them)."""
    from posttrain.models.builtin import SHAPED_MODELS, builtin_model_path
    from posttrain.models.loading import resolve_model_path

    return builtin_model_path(name) if name in SHAPED_MODELS else resolve_model_path(name)


# ---- data ---------------------------------------------------------------------------------------------------

def _windows(tokenizer, n: int, seed: int, low: int | None = None,
             high: int | None = None) -> list[tuple[str, str, str]]:
    """n (prompt, completion_a, completion_b) triples cut from the built-in arithmetic text, 64–256 tokens each
    (MIN_TOKENS–MAX_TOKENS)."""
    low = MIN_TOKENS if low is None else low
    high = MAX_TOKENS if high is None else high
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


TOOLS_TASK = "grpo-tools"  # GRPO with a calculator tool (issue 24): word problems, both libraries' tools= path


def tools_chat_template() -> str:
    """Qwen2.5's chat template (Hermes-form `<tool_call>` JSON), as TRL 1.16 ships it: TRL's GRPOTrainer(tools=...)
    parses tool calls only for templates it recognises, so both libraries render and parse with this one. Read as a
    data file from TRL's installed package (trl is not imported here)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {TOOLS_TASK} task needs TRL installed (its Qwen2.5 chat template): pip install trl")
    with open(os.path.join(spec.submodule_search_locations[0], "chat_templates", "qwen2_5.jinja")) as f:
        return f.read()


def calculator_tool():
    """The examples' calculator tool (examples/agentic_tools.py; examples/ is no package, so from its folder)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from agentic_tools import calculator

    return calculator


def build_dataset(task: str, tokenizer):
    import datasets

    rows = BATCH * STEPS
    if task in ("grpo", TOOLS_TASK):
        rows = GRPO_BATCH // GRPO_GENERATIONS * STEPS
    if task == TOOLS_TASK:  # conversational word problems (posttrain/wordmath-prompts), the first `rows`
        from posttrain.data.arith import load_builtin_dataset

        questions = load_builtin_dataset("posttrain/wordmath-prompts", split=f"train[:{rows}]")
        return questions.select_columns(["prompt"])
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
    return None  # grpo, grpo-tools: counted from the run (completion lengths vary)


def _digit_share_reward(completions, **kwargs):
    """A cheap, deterministic reward (same for both libraries): share of digit characters."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def _config_kwargs(task: str, variant: str, out: str) -> dict:
    # a fresh output_dir per run: a killed run leaves its emergency checkpoint there, which the next run would refuse
    shutil.rmtree(out, ignore_errors=True)
    kw = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-5,
              report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
              dataloader_num_workers=0)
    if task in ("sft", "dpo", "reward", "kto"):
        kw["max_length"] = 1024
    if task in ("grpo", TOOLS_TASK):
        kw.update(per_device_train_batch_size=GRPO_BATCH, num_generations=GRPO_GENERATIONS,
                  max_completion_length=MAX_NEW_TOKENS)
    if task == TOOLS_TASK:
        kw["max_tool_calling_iterations"] = 3
    if variant.startswith("trl"):
        # TRL's default bf16=True stops a CPU-only run at once ("Your setup doesn't support bf16/gpu. You need to
        # assign use_cpu"): use_cpu=True is the one flag a CPU user must add.
        kw["use_cpu"] = DEVICE == "cpu"
    elif DEVICE == "cpu":
        import torch

        if torch.cuda.is_available():  # --device cpu on a machine with a GPU
            kw["use_cpu"] = True
    if variant.startswith("trl-best"):
        kw.update(gradient_checkpointing=False, bf16=variant.endswith("bf16"))
    if variant == "posttrain-bf16":
        kw["bf16"] = True
    if variant.startswith("posttrain") and os.environ.get("POSTTRAIN_BENCH_OPTIONS"):  # A/B runs of one option
        kw.update(json.loads(os.environ["POSTTRAIN_BENCH_OPTIONS"]))
    return kw
