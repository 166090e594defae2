"""`posttrain merge --adapter DIR --output_dir OUT`: fold a saved LoRA adapter into its base model's weights.

The adapter directory names its base (`base_model_name_or_path` in adapter_config.json: a Hub id, local directory
or built-in name); the merged model, with the tokenizer, loads with `AutoModelForCausalLM.from_pretrained(OUT)`.
Not here: adapter loading and merging themselves (`models/adapters.py`).
"""

from __future__ import annotations

import argparse
import os

from posttrain.errors import UserError


class MergeError(UserError):
    """A bad option for `posttrain merge`."""


def _error(message: str) -> None:
    raise MergeError(message + " (see posttrain merge --help)")


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="posttrain merge", description="Merge a LoRA adapter into its base model.",
                                     allow_abbrev=False)
    parser.add_argument("--adapter", required=True, help="directory with adapter_config.json (a run's output_dir)")
    parser.add_argument("--output_dir", required=True, help="where the merged model goes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.error = _error
    args = parser.parse_args(argv)
    from posttrain.models import adapters, loading

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise MergeError(f"--output_dir {args.output_dir!r} is a file, not a directory; choose a directory for the "
                         "merged model")
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise MergeError(f"{args.adapter!r} holds no adapter_config.json; give the output_dir of a run trained "
                         "with --use_peft True")
    model = adapters.load_adapter_model(args.adapter, trainable=False, dtype=args.dtype)
    try:
        tokenizer = loading.load_tokenizer(args.adapter)
    except (OSError, ValueError):
        tokenizer = loading.load_tokenizer(model.peft_config[model.active_adapter].base_model_name_or_path)
    adapters.save_merged(model, tokenizer, args.output_dir)
    print(f"posttrain: merged {args.adapter} into {args.output_dir}")
    return args.output_dir
