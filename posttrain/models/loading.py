"""Loading models and tokenizers by name: built-in models, local directories, GGUF files and Hub ids alike.

Lives here: name resolution (built-in → local cache dir), `from_pretrained` with posttrain's defaults, tokenizer
fixes every trainer needs (pad token fallback, EOS override, chat template override), dropout switch-off. This is
the one entry point: every trainer, the CLI and the pipeline load models and tokenizers through it.
Not here: reference-model creation and PEFT wrapping policies (trainers decide), log-prob code (`logprobs.py`),
the GGUF reader itself (`models/gguf.py`), building built-in models (`models/builtin.py`, `models/packaged.py`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from posttrain import hardware
from posttrain.errors import UserError

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name (posttrain/tiny, …) becomes its materialised local directory; anything else is unchanged."""
    from posttrain.models import packaged
    from posttrain.models.builtin import BUILTIN_MODELS, builtin_model_path, is_builtin_model

    if is_builtin_model(name_or_path):
        return builtin_model_path(name_or_path)
    from posttrain.models import vision  # built-in tiny VLMs (models/vision.py)

    if vision.is_builtin_vlm(name_or_path):
        return vision.builtin_vlm_path(name_or_path)
    if packaged.is_packaged_model(name_or_path):
        return packaged.packaged_model_path(name_or_path)
    if name_or_path.startswith("posttrain/"):
        raise UserError(f"Unknown built-in model {name_or_path!r}; available: "
                        f"{', '.join([*BUILTIN_MODELS, *vision.BUILTIN_VLMS, *packaged.PACKAGED_MODELS])}.")
    if os.path.sep in name_or_path and not os.path.exists(name_or_path):
        if _is_missing_local(name_or_path):
            raise UserError(f"Model path {name_or_path!r} does not exist. Give a local directory with config.json, "
                            "a Hub id, or a built-in name such as posttrain/tiny.")
        problem = _hub_problem(name_or_path)
        if problem:
            raise UserError(f"Model {name_or_path!r} is not a local path (no such directory here) and {problem}. Give "
                            "a local directory with config.json, a reachable Hub id, or a built-in name.")
    return name_or_path


@functools.lru_cache(maxsize=64)
def _hub_problem(name: str) -> str:
    """Why `name` cannot come from the Hub — "" when it can (or is cached, or we cannot tell). One probe with a short
    timeout instead of the minute of retries `from_pretrained` spends when the Hub is unreachable."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return ""
    try:
        model_info(name, timeout=5)
    except RepositoryNotFoundError:
        return "the Hub has no model of that name"
    except Exception as e:  # connection errors differ between huggingface_hub's HTTP backends
        kind = type(e).__name__
        if isinstance(e, OSError) or any(w in kind for w in ("Connect", "Timeout", "Network", "Offline")):
            return f"the Hub cannot be reached from here ({kind})"
    return ""


def _is_missing_local(name: str) -> bool:
    """A path that is not there but is surely meant as a local one — it starts with '.' or '/', its first folder
    exists here (`outputs/sft-arith` run from the wrong directory), it has more than two parts, or the Hub is
    offline and its cache holds no such id — so that no minute is spent on Hub retries before saying so."""
    parts = name.strip("/").split("/")
    if name.startswith((".", "/", "~")) or len(parts) > 2 or os.path.isdir(parts[0]):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        return not isinstance(try_to_load_from_cache(name, "config.json"), str)
    return False


def _hub_kernels_unreachable() -> bool:
    """True when the Hub is offline: transformers (5.2x, with the `kernels` package installed) enables its Hub
    kernels by default and fetches them when the model first trains on a GPU, which fails offline ("Version 2 of
    'kernels-community/rotary' is not available in the local cache", seen on an H200), also for the plain loop."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _resolve_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    """posttrain's `from_pretrained` defaults: float32 unless a dtype is given (bf16 only where it is native), and no
    Hub kernels when the Hub is offline (a `use_kernels` the caller gives is kept)."""
    kwargs = dict(kwargs)
    if "use_kernels" not in kwargs and _hub_kernels_unreachable():
        kwargs["use_kernels"] = False
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
    from posttrain.models import gguf

    if gguf.is_gguf_source(name_or_path, init_kwargs):  # dequantized into the training dtype (models/gguf.py)
        return gguf.load_gguf_model(name_or_path, auto_class, **_resolve_dtype(init_kwargs))
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in
                                       ("config.json", "adapter_config.json")):
        raise UserError(f"Model directory {name_or_path!r} has no config.json. Give a directory written by "
                        "save_pretrained (config.json and weights), a Hub id, or a built-in name such as "
                        "posttrain/tiny.")
    from posttrain.models import adapters, vision

    if adapters.is_adapter_dir(path):  # a saved LoRA adapter: its base model with the adapter, trainable
        return adapters.load_adapter_model(path, auto_class, **init_kwargs)
    if auto_class is AutoModelForCausalLM and vision.is_vision_config(path):  # a VLM (models/vision.py)
        auto_class = vision.image_text_auto_class()
    try:
        return auto_class.from_pretrained(path, **_resolve_dtype(init_kwargs))
    except OSError as e:
        raise UserError(f"Could not load model {name_or_path!r}: {str(e).splitlines()[0]} "
                        "Give a local directory with config.json, a Hub id, or a built-in name "
                        "such as posttrain/tiny.") from e


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """The tokenizer of a model name, directory, Hub id or GGUF file (`x.gguf`, or a directory with `gguf_file=`)."""
    from transformers import AutoTokenizer

    from posttrain.models import gguf

    if gguf.is_gguf_source(name_or_path, kwargs):
        return gguf.load_gguf_tokenizer(name_or_path, **kwargs)
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
        chat_template_path = builtin_chat_template_path(chat_template_path)
        if not os.path.exists(chat_template_path) and chat_template_path.endswith((".jinja", ".j2", ".json")):
            raise UserError(f"chat_template_path {chat_template_path!r} does not exist; give a .jinja file, a "
                            "tokenizer directory or id, or a built-in template such as posttrain/chatml-tools.")
        if os.path.isfile(chat_template_path):
            with open(chat_template_path) as f:
                tok.chat_template = f.read()
        else:
            tok.chat_template = load_tokenizer(chat_template_path).chat_template
    return tokenizer


# chat templates shipped with posttrain, by name (chat_template_path: "posttrain/chatml-tools")
BUILTIN_CHAT_TEMPLATES = {"posttrain/chatml-tools": "chatml_tools.jinja"}


def builtin_chat_template_path(name: str) -> str:
    """The file of a shipped chat template named like `posttrain/chatml-tools` (ChatML with Hermes-form tool calls);
    any other value unchanged."""
    if name not in BUILTIN_CHAT_TEMPLATES:
        return name
    from posttrain.models.builtin import ASSETS_DIR

    return os.path.join(ASSETS_DIR, "chat_templates", BUILTIN_CHAT_TEMPLATES[name])


def model_short_name(model: torch.nn.Module | str) -> str:
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    base = os.path.basename(os.path.normpath(name))
    return (base[:-5] if base.lower().endswith(".gguf") else base) or "model"


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def check_quantization_config(config):
    """A `quantization_config=` given to a trainer, checked where it can be: a bitsandbytes config needs a CUDA GPU
    and the bitsandbytes package (one line saying so, instead of an error deep inside from_pretrained)."""
    method = getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method == "bitsandbytes":
        _require_bitsandbytes("quantization_config is a bitsandbytes config, which needs a CUDA GPU; this machine has "
                              "none. Drop quantization_config (LoRA alone still works on CPU).",
                              "quantization_config is a bitsandbytes config, which needs the bitsandbytes package: "
                              "pip install bitsandbytes (or drop quantization_config).")
    return config


def _require_bitsandbytes(no_gpu: str, no_package: str) -> None:
    """The two things bitsandbytes quantisation needs, each refused with its own one-line message."""
    import importlib.util

    if not hardware.has_cuda():
        raise UserError(no_gpu)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(no_package)


def quantization_config(load_in_4bit: bool, quant_type: str = "nf4", compute_dtype=None, double_quant: bool = False,
                        quant_storage: str | None = None):
    """bitsandbytes quantisation (4-bit computes in `compute_dtype`, bfloat16 by default); refused with a clear
    message where it cannot run."""
    _require_bitsandbytes("load_in_4bit/load_in_8bit need a CUDA GPU with bitsandbytes; this machine has none. "
                          "Drop the flag (LoRA alone still works on CPU).",
                          "load_in_4bit/load_in_8bit need the bitsandbytes package: pip install bitsandbytes "
                          "(or drop the flag).")
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=quant_storage)
    return BitsAndBytesConfig(load_in_8bit=True)
