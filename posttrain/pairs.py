"""`posttrain pairs`: preference pairs from a model's own answers, for DPO on on-policy data.

    posttrain pairs --model_name_or_path outputs/sft --dataset_name posttrain/wordmath-prompts \
        --reward_funcs accuracy_reward format_reward --num_generations 8 --output_dir outputs/pairs
    posttrain dpo --model_name_or_path outputs/sft --dataset_name outputs/pairs ...
    posttrain pairs --config examples/smollm2-pairs.yaml            (the flags as YAML keys; flags override)

Each prompt gets `num_generations` sampled answers (the rollout engine the online trainers use), scored by the
reward functions (weighted sum, as in GRPO); the best-scored answer becomes `chosen` and the worst `rejected`. A
prompt whose answers all score the same (all right, all wrong) gives no pair; the counts are written down. This is
the data of iterative / rejection-sampling DPO (the model learns from the contrast between its own right and wrong
answers, not from someone else's text). Ties for best or worst go to the earliest sample (samples are random).

Writes OUTPUT_DIR/train.jsonl (prompt, chosen, rejected, score_chosen, score_rejected and the data set's other
columns; conversational when the prompts are) and OUTPUT_DIR/pairs.json (counts, settings), atomically. A pipeline
runs it as a stage with `command: pairs`; a later stage reads it with `dataset_name: "{stages.NAME}"`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from posttrain.errors import UserError, did_you_mean
from posttrain.hardware import DECODING_DTYPES, DECODING_DTYPES_TEXT

PAIRS_FILE, COUNTS_FILE = "train.jsonl", "pairs.json"


class PairsError(UserError):
    """A bad option or data set for `posttrain pairs`."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain pairs", allow_abbrev=False,
                                description="Sample answers from a model and keep (best, worst) per prompt as "
                                            "preference pairs for DPO.")
    p.add_argument("--model_name_or_path", required=True, help="the model that answers (a run dir, Hub id, built-in)")
    p.add_argument("--dataset_name", required=True, help="prompts (a 'prompt' column, plus what the rewards read)")
    p.add_argument("--dataset_config", default=None)
    p.add_argument("--dataset_train_split", default="train", help="the split to read (default train)")
    p.add_argument("--num_prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--reward_funcs", nargs="+", default=["accuracy_reward"],
                   help="reward function names, module:function paths or reward models (as for grpo)")
    p.add_argument("--reward_weights", nargs="+", type=float, default=None)
    p.add_argument("--num_generations", type=int, default=8, help="answers sampled per prompt (at least 2)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=64, help="answers decoded together")
    p.add_argument("--dtype", choices=list(DECODING_DTYPES), default="float32",
                   help="decode with a copy of the model in this dtype; bfloat16 only on hardware that runs it "
                        "natively (a bf16 GPU, an AVX512-BF16/AMX CPU); auto: bfloat16 there, else float32")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", required=True)
    p.error = _error
    return p


def _error(message: str) -> None:
    raise PairsError(f"{message} (see posttrain pairs --help)")


def check_options(args: argparse.Namespace) -> None:
    if args.num_generations < 2:
        raise PairsError(f"--num_generations must be at least 2 (a pair needs two answers), got {args.num_generations}")
    if args.temperature <= 0:
        raise PairsError(f"--temperature must be > 0 (greedy answers to one prompt are all the same), "
                         f"got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise PairsError(f"--top_p must be in (0, 1], got {args.top_p}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise PairsError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise PairsError(f"--num_prompts must be at least 1, got {args.num_prompts}")
    if args.dtype not in DECODING_DTYPES:
        raise PairsError(f"--dtype must be {DECODING_DTYPES_TEXT}, got {args.dtype!r}")


@torch.no_grad()
def sample_pairs(model, tokenizer, rows: list[dict[str, Any]], rewards, num_generations: int = 8,
                 max_new_tokens: int = 128, generation_kwargs: dict[str, Any] | None = None,
                 batch_size: int = 64, dtype: torch.dtype | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs, counts): for each row, `num_generations` sampled answers scored by `rewards` (a RewardRunner); the
    best and worst as chosen/rejected when their scores differ. counts: prompts, pairs, all_same (no pair).
    `dtype`: decode with a copy of the model in that dtype (e.g. torch.bfloat16 on native-bf16 hardware)."""
    from posttrain.evaluation import answer_batches, sampling_kwargs

    generation_kwargs = generation_kwargs or sampling_kwargs(1.0)
    was_training = model.training
    model.eval()
    found: list[tuple[int, dict[str, Any]]] = []  # (row number, pair): decoded shortest prompt first
    progress = tqdm(total=len(rows), unit="prompt", desc="pairs", mininterval=5)
    try:
        for batch in answer_batches(model, tokenizer, rows, num_generations, max_new_tokens, generation_kwargs,
                                    batch_size, dtype):
            progress.update(len(batch["rows"]) // num_generations)
            prompts, completions = [r["prompt"] for r in batch["rows"]], batch["completions"]
            scores = rewards.weighted_sum(rewards(prompts, completions, batch["completion_ids"], batch["columns"]))
            for first in range(0, len(completions), num_generations):
                group = scores[first:first + num_generations]
                best, worst = int(group.argmax()), int(group.argmin())
                if not group[best] > group[worst]:  # all equal (or NaN): no contrast to learn from
                    continue
                found.append((batch["index"][first], {**batch["rows"][first], "chosen": completions[first + best],
                                                      "rejected": completions[first + worst],
                                                      "score_chosen": float(group[best]),
                                                      "score_rejected": float(group[worst])}))
    finally:
        progress.close()
        model.train(was_training)
    pairs = [pair for _, pair in sorted(found, key=lambda p: p[0])]  # in the rows' order
    return pairs, {"prompts": len(rows), "pairs": len(pairs), "all_same": len(rows) - len(pairs)}


def option_defaults() -> dict[str, Any]:
    """Every option of this command with its default."""
    return {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}


def resolve_options(options: dict[str, Any]) -> argparse.Namespace:
    """This command's options from a dict (a pipeline stage, a --config file), checked; defaults filled in."""
    defaults = option_defaults()
    for key in options:
        if key not in defaults:
            raise PairsError(f"unknown option '{key}' for pairs{did_you_mean(key, defaults)} (options: "
                             f"{', '.join(defaults)})")
    for key in ("model_name_or_path", "dataset_name", "output_dir"):
        if not options.get(key):
            raise PairsError(f"pairs needs {key}")
    args = argparse.Namespace(**{**defaults, **options})
    check_options(args)
    return args


def run(options: dict[str, Any]) -> dict[str, Any]:
    """Build the pairs for `options` (this command's flags as a dict); returns the counts written."""
    args = resolve_options(options)
    from posttrain.data.loading import load_any_dataset
    from posttrain.models import loading
    from posttrain.reporting.atomic import write_text
    from posttrain.rewards.runner import RewardRunner

    start = time.time()
    dataset = load_any_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split)
    if len(dataset) == 0 or "prompt" not in dataset.column_names:
        raise PairsError(f"data set {args.dataset_name!r} ({args.dataset_train_split}) needs rows with a 'prompt' "
                         f"column; it has {len(dataset)} rows and columns {dataset.column_names}")
    if args.num_prompts is not None:
        dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
    from posttrain.evaluation import decoding_dtype

    dtype = decoding_dtype(args.dtype)  # before loading: refuses bfloat16 where it would be emulated
    rewards = RewardRunner(args.reward_funcs, args.reward_weights)
    model = loading.load_pretrained_model(args.model_name_or_path)
    tokenizer = loading.load_tokenizer(args.model_name_or_path)
    loading.prepare_tokenizer(tokenizer)
    torch.manual_seed(args.seed)
    pairs, counts = sample_pairs(model, tokenizer, list(dataset), rewards, args.num_generations, args.max_new_tokens,
                                 {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k,
                                  "top_p": args.top_p}, args.batch_size, dtype)
    if not pairs:
        raise PairsError(f"no pairs: every prompt's {args.num_generations} answers scored the same (all right or all "
                         "wrong); sample more answers (--num_generations), at a higher --temperature, or use prompts "
                         "nearer the model's level")
    counts.update(model=args.model_name_or_path, dataset=args.dataset_name, num_generations=args.num_generations,
                  temperature=args.temperature, reward_funcs=list(map(str, args.reward_funcs)),
                  dtype="float32" if dtype is None else "bfloat16",
                  seconds=round(time.time() - start, 1))
    write_text(os.path.join(args.output_dir, PAIRS_FILE), "".join(json.dumps(p) + "\n" for p in pairs))
    write_text(os.path.join(args.output_dir, COUNTS_FILE), json.dumps(counts, indent=1))
    return counts


def main(argv: list[str]) -> None:
    from posttrain.cli import _pop_flag, _read_yaml

    argv = list(argv)
    config = _pop_flag(argv, "--config")
    from_file = _read_yaml(config) if config else {}
    parser = build_parser()
    for action in parser._actions:  # the file's values are defaults the flags override
        if action.dest in from_file:
            action.required, action.default = False, from_file[action.dest]
    args = argparse.Namespace(**{**from_file, **vars(parser.parse_args(argv))})
    counts = run(vars(args))
    print(f"posttrain pairs: {counts['pairs']} pairs from {counts['prompts']} prompts ({counts['all_same']} with all "
          f"answers scored the same) in {counts['seconds']:.0f}s → {os.path.join(args.output_dir, PAIRS_FILE)}")
