"""Reading GGUF files (llama.cpp's format) as ordinary trainable models and tokenizers.

A model may be given as `path/to/model.gguf`, or as a directory with `gguf_file="model.gguf"` among the
`from_pretrained` keyword arguments (`model_init_kwargs`). transformers reads the file with the `gguf` package and
dequantizes every tensor (Q4_1, Q8_0, …) to the training dtype; the tokenizer, its chat template and the special
token ids come from the file's metadata. transformers marks such a model as "gguf-quantized" and refuses
`save_pretrained`; the weights are already plain tensors, so `load_gguf_model` moves them into a model built from
the same config without that mark, and a trained model saves as an ordinary safetensors checkpoint.

Lives here: recognising a GGUF source, the one-line errors (no `gguf` package, an architecture transformers cannot
read), model and tokenizer loading, and the pre-tokenizer fix for vocabularies transformers rebuilds imperfectly.
Not here: name resolution and posttrain's loading defaults (`models/loading.py`, the single entry point), writing
GGUF files (`models/gguf_export.py`), the packaged SmolLM2 model (`models/packaged.py`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from posttrain.errors import UserError

INSTALL_HINT = "pip install 'posttrain[gguf]' (or: pip install gguf)"


def is_gguf_source(name_or_path: str, init_kwargs: dict | None = None) -> bool:
    """Whether a model argument names a GGUF file: `x.gguf`, or anything with `gguf_file` in its kwargs."""
    return str(name_or_path).lower().endswith(".gguf") or bool((init_kwargs or {}).get("gguf_file"))


def split_source(name_or_path: str, init_kwargs: dict | None = None) -> tuple[str, str, dict]:
    """(directory, file name, remaining kwargs) for `from_pretrained(directory, gguf_file=file name, ...)`."""
    kwargs = dict(init_kwargs or {})
    gguf_file = kwargs.pop("gguf_file", None)
    if gguf_file is None:
        directory, gguf_file = os.path.split(os.path.abspath(name_or_path))
    else:
        directory = name_or_path
    path = os.path.join(directory, gguf_file)
    if not os.path.isfile(path):
        raise UserError(f"GGUF file {path!r} does not exist; give the path of a .gguf file (or a directory and "
                        "gguf_file=NAME in model_init_kwargs).")
    return directory, gguf_file, kwargs


def require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"Reading or writing GGUF files needs the gguf package: {INSTALL_HINT}.") from None


def _architecture_error(path: str, error: ValueError) -> ValueError:
    """transformers' "GGUF model with architecture X is not supported yet." as posttrain's one-line error."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    match = re.search(r"architecture '?([\w.\-]+)'? is not supported", str(error))
    arch = match.group(1) if match else "?"
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping keys, not archs
    return ValueError(f"GGUF architecture {arch!r} ({os.path.basename(path)}) cannot be read by transformers "
                      f"{_transformers_version()}; readable: {', '.join(readable)}. "
                      "Use the original checkpoint instead, or a newer transformers.")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _from_pretrained(auto_class, directory: str, gguf_file: str, **kwargs: Any):
    try:
        return auto_class.from_pretrained(directory, gguf_file=gguf_file, **kwargs)
    except ValueError as e:
        if re.search(r"architecture .* is not supported", str(e)):
            raise _architecture_error(os.path.join(directory, gguf_file), e) from e
        raise


def load_gguf_model(name_or_path: str, auto_class, **init_kwargs: Any):
    """A model dequantized from a GGUF file into `init_kwargs["dtype"]`, savable with `save_pretrained`.

    `config._name_or_path` is the file's path, so a tokenizer loaded "from the model" reads the same file.
    """
    import torch

    require_gguf_package()
    directory, gguf_file, kwargs = split_source(name_or_path, init_kwargs)
    path = os.path.join(directory, gguf_file)
    loaded = _from_pretrained(auto_class, directory, gguf_file, **kwargs)
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):  # the gguf mark; the file's display name
        if hasattr(config, key):
            delattr(config, key)
    config._name_or_path = path
    with torch.device("meta"):  # no random init: every parameter comes from the loaded model
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    for name, buffer in loaded.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        _set_buffer(model, name, buffer)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"GGUF file {path!r} has no weights for {missing[0]} (and {len(missing) - 1} more); "
                        "the file does not match its stated architecture.")
    if getattr(loaded, "generation_config", None) is not None:  # causal LMs only
        model.generation_config = loaded.generation_config
    model.eval()  # as from_pretrained leaves it
    return model


def _set_buffer(model, name: str, buffer) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    persistent = attr not in getattr(module, "_non_persistent_buffers_set", set())
    module.register_buffer(attr, buffer, persistent=persistent)


def load_gguf_tokenizer(name_or_path: str, **kwargs: Any):
    """The tokenizer a GGUF file describes (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    require_gguf_package()
    directory, gguf_file, kwargs = split_source(name_or_path, kwargs)
    path = os.path.join(directory, gguf_file)
    tokenizer = _from_pretrained(AutoTokenizer, directory, gguf_file, **kwargs)
    fields = _metadata(path)
    fix_pre_tokenizer(tokenizer, fields.get("tokenizer.ggml.pre"))
    context = fields.get(f"{fields.get('general.architecture')}.context_length")
    if context and tokenizer.model_max_length > 1e9:  # transformers leaves it "unlimited"
        tokenizer.model_max_length = int(context)
    tokenizer.name_or_path = path
    return tokenizer


def _metadata(path: str) -> dict[str, Any]:
    """The file's scalar and string metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        fields = GGUFReader(path).fields
    except (ValueError, OSError) as e:
        raise UserError(f"{path!r} is not a readable GGUF file ({e}); give a file written by llama.cpp's "
                        "converters or `posttrain export --gguf`.") from e
    return {key: field.contents() for key, field in fields.items() if field.types[:1] != [GGUFValueType.ARRAY]}


def fix_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """llama.cpp's "smollm" splitting (every digit alone, then GPT-2's regex) for a vocabulary that transformers
    rebuilds with GPT-2's splitting only: without it "123" could become one token the model never saw in training."""
    if pre != "smollm":
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
