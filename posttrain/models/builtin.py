"""Built-in tiny causal LMs, addressable by name (`posttrain/tiny`, …) and materialised on first use, offline.

Each name maps to config kwargs; `builtin_model_path` writes a randomly initialised (seed 0) model, its generation
config and the shipped tokenizer into `$POSTTRAIN_CACHE/models/<name with / as -->` (default cache
`~/.cache/posttrain`) so the ordinary `from_pretrained` path loads it. Parameter counts (embeddings tied):

    posttrain/tiny          1,016,960   Qwen2, hidden 128, 2 layers, 4 heads / 2 KV, MLP 512, vocab 4,096 (tests)
    posttrain/tiny-llama    1,016,448   Llama, same shape as posttrain/tiny (architecture coverage)
    posttrain/tiny-4m       4,198,656   Qwen2, hidden 256, 4 layers, 8 heads / 4 KV, MLP 768, vocab 4,096 (demos)
    posttrain/tiny-15m     12,916,992   Qwen2, hidden 256, 6 layers, 8 heads / 4 KV, MLP 768, vocab 32,000
                                        (benchmarks; rows past the tokenizer's 4,096 are unused padding, as in
                                        real models)

Benchmark shapes (`SHAPED_MODELS`, materialised by the same `builtin_model_path` but not in the registry above,
so the CLI, name resolution and the tests leave them alone: a 0.5B model is 2 GB on disk, seconds to build):

    posttrain/shape-qwen2-0.5b  494,032,768   Qwen2-0.5B's shape with random weights: hidden 896, 24 layers,
                                        14 heads / 2 KV, MLP 4,864, vocab 151,936 (the shipped tokenizer uses the
                                        first 4,096 rows), rope theta 1e6 (benchmarks/compare_trl.py --model)
    posttrain/shape-smollm2-135m  134,515,008  SmolLM2-135M's shape with random weights (Llama: hidden 576,
                                        30 layers, 9 heads / 3 KV, MLP 1,536, vocab 49,152): its speed without
                                        the 93 MB GGUF (the GPU benchmark, where the real file cannot travel)

Not here: loading with posttrain's defaults (`models/loading.py`), the tokenizer build (`scripts/build_tokenizer.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from posttrain.errors import UserError

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
_TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
_TOKENIZER_VOCAB = 4096
PAD_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID = 0, 2, None  # <|endoftext|>, <|im_end|>; the tokenizer has no BOS
_STAMP = "posttrain_builtin.json"

_COMMON = dict(tie_word_embeddings=True, use_cache=True, rope_theta=10000.0, max_position_embeddings=2048,
               hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02, attention_dropout=0.0,
               pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, bos_token_id=BOS_TOKEN_ID)
_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **_COMMON)
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
              **_COMMON)
_SMALL = dict(vocab_size=_TOKENIZER_VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=512)
_MEDIUM = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768)

BUILTIN_MODELS: dict[str, dict] = {
    "posttrain/tiny": {**_QWEN2, **_SMALL},
    "posttrain/tiny-llama": {**_LLAMA, **_SMALL},
    "posttrain/tiny-4m": {**_QWEN2, **_MEDIUM, "vocab_size": _TOKENIZER_VOCAB, "num_hidden_layers": 4},
    "posttrain/tiny-15m": {**_QWEN2, **_MEDIUM, "vocab_size": 32000, "num_hidden_layers": 6},
}

SHAPED_MODELS: dict[str, dict] = {
    "posttrain/shape-qwen2-0.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                                   "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                                   "rope_theta": 1000000.0},
    "posttrain/shape-smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
}


def _entry(name: str) -> dict:
    return BUILTIN_MODELS[name] if name in BUILTIN_MODELS else SHAPED_MODELS[name]


def is_builtin_model(name: str) -> bool:
    return name in BUILTIN_MODELS


def builtin_tokenizer_path() -> str:
    """The shipped tokenizer directory (byte-level BPE, 4,096 tokens, ChatML template)."""
    return _TOKENIZER_DIR


def cache_dir() -> str:
    return os.environ.get("POSTTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "posttrain")


def _fingerprint(name: str) -> str:
    """Changes when the registry entry or the shipped tokenizer changes, so a stale cached model is rebuilt."""
    digest = hashlib.sha256(json.dumps(_entry(name), sort_keys=True).encode())
    for file in sorted(os.listdir(_TOKENIZER_DIR)):
        with open(os.path.join(_TOKENIZER_DIR, file), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _is_current(path: str, fingerprint: str) -> bool:
    try:
        with open(os.path.join(path, _STAMP)) as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _write_model(name: str, out: str, fingerprint: str) -> None:
    """Config, seed-0 weights, generation config, tokenizer files and a stamp, all into `out`."""
    import torch
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kwargs = dict(_entry(name))
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    # fork_rng: seeding must not disturb the caller's random state. The class itself, not from_config: under a
    # DeepSpeed ZeRO-3 run from_config partitions the weights (zero.Init) and the saved file would hold empty
    # tensors; the plain constructor gives the same seed-0 weights either way.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).to(torch.float32)
    model.save_pretrained(out)
    generation = GenerationConfig(eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID)
    generation.save_pretrained(out)
    for file in os.listdir(_TOKENIZER_DIR):
        shutil.copy(os.path.join(_TOKENIZER_DIR, file), out)
    with open(os.path.join(out, _STAMP), "w") as f:
        json.dump({"name": name, "fingerprint": fingerprint}, f)


def _swap_in(tmp: str, final: str, fingerprint: str) -> None:
    """Rename `tmp` to `final` atomically; when another process got there first with a current model, keep theirs."""
    try:
        os.replace(tmp, final)
        return
    except OSError:  # `final` exists and is not empty
        pass
    if _is_current(final, fingerprint):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    stale = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.stale-", dir=os.path.dirname(final))
    os.replace(final, os.path.join(stale, "old"))  # move the stale model aside, then take its place
    os.replace(tmp, final)
    shutil.rmtree(stale, ignore_errors=True)


def _wait_until_current(final: str, fingerprint: str, timeout: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not _is_current(final, fingerprint):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Built-in model {final!r} was not written by process 0 within {timeout:.0f}s; "
                               "build it with one process first (any posttrain command on it), then relaunch.")
        time.sleep(0.2)


def builtin_model_path(name: str) -> str:
    """The local directory of built-in model `name`, written on first use (atomically; safe for parallel callers).

    Also takes the benchmark shapes of `SHAPED_MODELS`.
    """
    if name not in BUILTIN_MODELS and name not in SHAPED_MODELS:
        raise UserError(f"Unknown built-in model {name!r}; available: {', '.join(BUILTIN_MODELS)}.")
    root = os.path.join(cache_dir(), "models")
    final = os.path.join(root, name.replace("/", "--"))
    fingerprint = _fingerprint(name)
    if _is_current(final, fingerprint):
        return final
    os.makedirs(root, exist_ok=True)
    # Build beside the final directory (same file system, so the rename is atomic); a crash leaves only a
    # dot-prefixed temp dir, never a half-written model under the final name.
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _write_model(name, tmp, fingerprint)
        if os.path.isfile(os.path.join(tmp, "config.json")):
            _swap_in(tmp, final, fingerprint)
        else:  # inside a process group transformers writes weights on rank 0 only: use rank 0's copy
            _wait_until_current(final, fingerprint)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
