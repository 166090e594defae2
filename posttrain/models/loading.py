"""Loading models and tokenizers by name: built-in tiny models, local directories and Hub ids alike.

Lives here: name resolution (built-in → local cache dir), `from_pretrained` with posttrain's defaults, tokenizer
fixes every trainer needs (pad token fallback, EOS override, chat template override), dropout switch-off.
Not here: reference-model creation and PEFT wrapping policies (trainers decide), log-prob code (`logprobs.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from posttrain import hardware
from posttrain.errors import UserError

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name (posttrain/tiny, …) becomes its materialised local directory; anything else is unchanged."""
    from posttrain.models.builtin import builtin_model_path, is_builtin_model

    if is_builtin_model(name_or_path):
        return builtin_model_path(name_or_path)
    if name_or_path.startswith("posttrain/"):
        from posttrain.models.builtin import BUILTIN_MODELS

        raise UserError(f"Unknown built-in model {name_or_path!r}; available: {', '.join(BUILTIN_MODELS)}.")
    if os.path.sep in name_or_path and not os.path.exists(name_or_path) and name_or_path.startswith((".", "/")):
        raise UserError(f"Model path {name_or_path!r} does not exist. Give a local directory with config.json, "
                        "a Hub id, or a built-in name such as posttrain/tiny.")
    return name_or_path


def _resolve_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    dtype = kwargs.pop("torch_dtype", None) or kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and not hardware.has_cuda() and not hardware.cpu_has_fast_bf16():
        logger.warning("bfloat16 weights on a CPU without native bf16 run ~30x slower; loading in float32.")
        dtype = torch.float32
    kwargs["dtype"] = dtype
    return kwargs


def load_pretrained_model(name_or_path: str, auto_class=None, **init_kwargs: Any) -> torch.nn.Module:
    """`auto_class.from_pretrained` (default AutoModelForCausalLM) with float32 as the default dtype."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in
                                       ("config.json", "adapter_config.json")):
        raise UserError(f"Model directory {name_or_path!r} has no config.json. Give a directory written by "
                        "save_pretrained (config.json and weights), a Hub id, or a built-in name such as "
                        "posttrain/tiny.")
    from posttrain.models import adapters

    if adapters.is_adapter_dir(path):  # a saved LoRA adapter: its base model with the adapter, trainable
        return adapters.load_adapter_model(path, auto_class, **init_kwargs)
    try:
        return auto_class.from_pretrained(path, **_resolve_dtype(init_kwargs))
    except OSError as e:
        raise UserError(f"Could not load model {name_or_path!r}: {str(e).splitlines()[0]} "
                        "Give a local directory with config.json, a Hub id, or a built-in name "
                        "such as posttrain/tiny.") from e


def load_tokenizer(name_or_path: str, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def prepare_tokenizer(tokenizer, eos_token: str | None = None, pad_token: str | None = None,
                      chat_template_path: str | None = None):
    """Apply the fixes every trainer needs, in place: EOS/pad overrides, pad falls back to EOS, chat template."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    for role, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if token is not None:
            if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
                raise UserError(f"{role}={token!r} is not in the tokenizer's vocabulary; pick an existing token.")
            setattr(tok, role, token)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError("The tokenizer has neither a pad nor an EOS token; set pad_token=... in the config.")
        tok.pad_token = tok.eos_token
        logger.info("The tokenizer has no pad token; using its EOS token %r for padding.", tok.eos_token)
    if chat_template_path is not None:
        if os.path.isfile(chat_template_path):
            with open(chat_template_path) as f:
                tok.chat_template = f.read()
        else:
            from transformers import AutoTokenizer

            tok.chat_template = AutoTokenizer.from_pretrained(chat_template_path).chat_template
    return tokenizer


def model_short_name(model: torch.nn.Module | str) -> str:
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    return os.path.basename(os.path.normpath(name)) or "model"


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def quantization_config(load_in_4bit: bool):
    """bitsandbytes quantisation; refused with a clear message where it cannot run."""
    if not hardware.has_cuda():
        raise UserError("load_in_4bit/load_in_8bit need a CUDA GPU with bitsandbytes; this machine has none. "
                        "Drop the flag (LoRA alone still works on CPU).")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("load_in_4bit/load_in_8bit need the bitsandbytes package: pip install bitsandbytes "
                        "(or drop the flag).")
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)
