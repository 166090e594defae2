"""`posttrain export RUN_DIR --gguf OUT.gguf [--outtype f32|f16|q8_0]`: a trained model as one GGUF file.

RUN_DIR is a run's output_dir (or any model posttrain loads: a checkpoint directory, a built-in name, a Hub id, a
GGUF file). A LoRA run (adapter_config.json) is merged into its base model first. The tokenizer and its chat template
go into the file, so `llama-cli -m OUT.gguf` or `llama_cpp.Llama(OUT.gguf)` chats with the model as trained.
Not here: the GGUF writer (`models/gguf_export.py`).
"""

from __future__ import annotations

import argparse
import os
import time

from posttrain.errors import UserError


class ExportError(UserError):
    """A bad option for `posttrain export`."""


def _error(message: str) -> None:
    raise ExportError(message + " (see posttrain export --help)")


def load_for_export(source: str):
    """(plain causal LM in float32 with any adapter merged, tokenizer) of a run directory or model name."""
    import torch

    from posttrain.models import adapters, loading

    if adapters.is_adapter_dir(source):
        model = adapters.load_adapter_model(source, trainable=False, dtype=torch.float32).merge_and_unload()
    else:
        model = loading.load_pretrained_model(source, dtype=torch.float32)
    try:
        tokenizer = loading.load_tokenizer(source)
    except (OSError, ValueError):  # an adapter directory saved without its tokenizer: the base model's
        tokenizer = loading.load_tokenizer(model.config._name_or_path)
    return model.eval(), tokenizer


def main(argv: list[str]) -> dict:
    from posttrain.models.gguf_export import OUTTYPES

    parser = argparse.ArgumentParser(prog="posttrain export", allow_abbrev=False,
                                     description="Write a trained model as a GGUF file (llama.cpp, Ollama, LM Studio).")
    parser.add_argument("run_dir", help="a run's output_dir (LoRA runs are merged first), or any model name or path")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES,
                        help="tensor type of the weight matrices: f32 (exact), f16 (default), q8_0 (8-bit blocks)")
    parser.error = _error
    args = parser.parse_args(argv)
    if not args.gguf.lower().endswith(".gguf"):
        raise ExportError(f"--gguf {args.gguf!r} should end in .gguf")
    from posttrain.models.gguf import require_gguf_package
    from posttrain.models.gguf_export import export_gguf

    require_gguf_package()
    start = time.time()
    model, tokenizer = load_for_export(args.run_dir)
    name = os.path.basename(os.path.normpath(args.run_dir))
    info = export_gguf(model, tokenizer, args.gguf, args.outtype, name=name)
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(info["types"].items()))
    print(f"posttrain: exported {args.run_dir} to {args.gguf} in {time.time() - start:.0f}s: "
          f"{info['bytes'] / 2**20:.1f} MiB, {info['tensors']} tensors ({types}), pre-tokenizer {info['pre']}")
    return info
