"""Offline stand-ins for the Hub repositories TRL's tests load: tiny random-init models and the `zen` datasets.

Models: `trl-internal-testing/tiny-<Architecture>[-<version>]` becomes a randomly initialised model of that
transformers class (2 layers, hidden size 16) with posttrain's built-in BPE tokenizer and, where TRL ships the
chat template of that family, TRL's template read from the installed `trl` package at build time (so TRL's
template-matching code paths see the real template). They are written into a Hugging Face hub cache
(`<HF_HOME>/hub/models--org--name/snapshots/<rev>/` and `refs/main`), so `from_pretrained(hub_id)` works
with HF_HUB_OFFLINE=1. Architectures that cannot be built here (vision-language models, DeepSeek-V3, remote
code) are left out: tests that load them fail with an offline "not cached" error and are counted "not runnable".

Datasets: `zen_dataset(config, split, streaming)` builds `trl-internal-testing/zen` look-alikes (the same configs
and columns, Zen of Python sentences); the harness plugin routes `datasets.load_dataset` to it.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

REVISION = "0" * 40  # the snapshot name; any 40-hex string works

# hub id -> (transformers class, TRL chat template name or None)
MODELS = {
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", "qwen2_5"),
    "trl-internal-testing/small-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", "qwen2_5"),
    "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2ForSequenceClassification", "qwen2_5"),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": ("Qwen3ForCausalLM", "qwen3"),
    "trl-internal-testing/tiny-Qwen3ForCausalLM-Instruct-2507": ("Qwen3ForCausalLM", "qwen3_instruct_2507"),
    "trl-internal-testing/tiny-Qwen3ForSequenceClassification": ("Qwen3ForSequenceClassification", "qwen3"),
    "trl-internal-testing/tiny-Qwen3MoeForCausalLM": ("Qwen3MoeForCausalLM", "qwen3"),
    "trl-internal-testing/tiny-LlamaForCausalLM-3": ("LlamaForCausalLM", None),
    "trl-internal-testing/tiny-LlamaForCausalLM-3.1": ("LlamaForCausalLM", None),
    "trl-internal-testing/tiny-LlamaForCausalLM-3.2": ("LlamaForCausalLM", None),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": ("LlamaForSequenceClassification", None),
    "trl-internal-testing/tiny-MistralForCausalLM-0.1": ("MistralForCausalLM", None),
    "trl-internal-testing/tiny-MistralForCausalLM-0.2": ("MistralForCausalLM", None),
    "trl-internal-testing/tiny-GptOssForCausalLM": ("GptOssForCausalLM", None),
    "trl-internal-testing/tiny-Gemma2ForCausalLM": ("Gemma2ForCausalLM", None),
    "trl-internal-testing/tiny-GemmaForCausalLM": ("GemmaForCausalLM", None),
    "trl-internal-testing/tiny-CohereForCausalLM": ("CohereForCausalLM", None),
    "trl-internal-testing/tiny-Cohere2ForCausalLM": ("Cohere2ForCausalLM", None),
    "trl-internal-testing/tiny-GPTNeoXForCausalLM": ("GPTNeoXForCausalLM", None),
    "trl-internal-testing/tiny-Phi3ForCausalLM": ("Phi3ForCausalLM", None),
    "trl-internal-testing/tiny-Phi3ForCausalLM-3": ("Phi3ForCausalLM", None),
    "trl-internal-testing/tiny-Phi3ForCausalLM-3.5": ("Phi3ForCausalLM", None),
    "trl-internal-testing/tiny-Olmo3ForCausalLM": ("Olmo3ForCausalLM", None),
    "trl-internal-testing/tiny-Glm4MoeForCausalLM": ("Glm4MoeForCausalLM", None),
    "trl-internal-testing/tiny-Lfm2ForCausalLM": ("Lfm2ForCausalLM", None),
    "trl-internal-testing/tiny-Lfm2ForCausalLM-2.5": ("Lfm2ForCausalLM", None),
    "trl-internal-testing/tiny-FalconMambaForCausalLM": ("FalconMambaForCausalLM", None),
    "trl-internal-testing/tiny-T5ForConditionalGeneration": ("T5ForConditionalGeneration", None),
}

_TINY = dict(
    hidden_size=16, d_model=16, intermediate_size=32, d_ff=32, num_hidden_layers=2, num_layers=2,
    num_decoder_layers=2, num_attention_heads=4, num_heads=4, num_key_value_heads=2, head_dim=8, d_kv=4,
    moe_intermediate_size=16, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, max_position_embeddings=2048, first_k_dense_replace=1,
)


def _tokenizer_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "posttrain" / "assets" / "tokenizer"


def _trl_template(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        import importlib.util

        spec = importlib.util.find_spec("trl")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "chat_templates" / f"{name}.jinja"
    return path.read_text() if path.exists() else None


def _build_model(arch: str, vocab_size: int, pad_id: int, eos_id: int, out: Path) -> None:
    import torch
    import transformers

    cls = getattr(transformers, arch)
    defaults = cls.config_class()
    kwargs = {k: v for k, v in _TINY.items() if hasattr(defaults, k)}
    kwargs.update(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    if arch.startswith("T5"):
        kwargs["decoder_start_token_id"] = pad_id
    if arch.endswith("SequenceClassification"):
        kwargs["num_labels"] = 1
    torch.manual_seed(0)
    model = cls(cls.config_class(**kwargs))
    model.save_pretrained(out)


def build_hub_cache(hf_home: str | os.PathLike, only: list[str] | None = None) -> dict[str, str]:
    """Write every model of MODELS into `<hf_home>/hub`; return {hub_id: "ok" | error}. Existing ones are kept."""
    from transformers import AutoTokenizer

    hub = Path(hf_home) / "hub"
    status = {}
    for hub_id, (arch, template) in MODELS.items():
        if only and hub_id not in only:
            continue
        repo = hub / ("models--" + hub_id.replace("/", "--"))
        snap = repo / "snapshots" / REVISION
        if (snap / "config.json").exists():
            status[hub_id] = "ok"
            continue
        tmp = repo / "snapshots" / (REVISION + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir()))
            text = _trl_template(template)
            if text is not None:
                tok.chat_template = text
            tok.save_pretrained(tmp)
            _build_model(arch, len(tok), tok.pad_token_id, tok.eos_token_id, tmp)
            tmp.rename(snap)
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(REVISION)
            status[hub_id] = "ok"
        except Exception as exc:  # an architecture this transformers cannot build: not runnable
            shutil.rmtree(tmp, ignore_errors=True)
            status[hub_id] = f"{type(exc).__name__}: {exc}"[:200]
    return status


# ---------------------------------------------------------------- datasets


def _zen_lines() -> list[str]:
    import sys

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if "this" in sys.modules:
            mod = sys.modules["this"]
        else:
            import this as mod
    lines = codecs.decode(mod.s, "rot13").splitlines()
    return [line for line in lines if line and not line.startswith("The Zen")]


def _split_sentence(line: str) -> tuple[str, str]:
    words = line.split(" ")
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _rows(config: str) -> list[dict]:
    lines = _zen_lines()
    rows = []
    for i, line in enumerate(lines):
        prompt, completion = _split_sentence(line)
        other = _split_sentence(lines[(i + 7) % len(lines)])[1]
        question = f"Complete the aphorism: {prompt.strip()}"
        user = [{"role": "user", "content": question}]
        good = [{"role": "assistant", "content": line}]
        bad = [{"role": "assistant", "content": prompt + other}]
        kind = config.split("_", 1)[1]
        conv = config.startswith("conversational")
        if kind == "language_modeling":
            rows.append({"messages": user + good} if conv else {"text": line})
        elif kind == "prompt_only":
            rows.append({"prompt": user} if conv else {"prompt": prompt})
        elif kind == "prompt_completion":
            rows.append({"prompt": user, "completion": good} if conv else {"prompt": prompt, "completion": completion})
        elif kind == "preference":
            rows.append({"prompt": user, "chosen": good, "rejected": bad} if conv else
                        {"prompt": prompt, "chosen": completion, "rejected": other})
        elif kind == "implicit_prompt_preference":
            rows.append({"chosen": user + good, "rejected": user + bad} if conv else
                        {"chosen": line, "rejected": prompt + other})
        elif kind == "unpaired_preference":
            label = i % 2 == 0
            comp = (good if label else bad) if conv else (completion if label else other)
            rows.append({"prompt": user if conv else prompt, "completion": comp, "label": label})
        elif kind == "stepwise_supervision":
            words = completion.split(" ")
            steps = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])]
            rows.append({"prompt": user if conv else prompt, "completions": steps, "labels": [True, i % 3 != 0]})
        else:
            raise KeyError(config)
    return rows


ZEN_CONFIGS = [f"{style}_{kind}" for style in ("standard", "conversational") for kind in (
    "language_modeling", "prompt_only", "prompt_completion", "preference", "implicit_prompt_preference",
    "unpaired_preference", "stepwise_supervision")]


def zen_dataset(config: str | None, split: str | None = None, streaming: bool = False):
    """The `trl-internal-testing/zen` look-alike: 17 train rows, 2 test rows; `split` may slice (`train[:2]`)."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    if config not in ZEN_CONFIGS:
        raise ValueError(f"BuilderConfig '{config}' not found. Available: {ZEN_CONFIGS}")
    rows = _rows(config)
    parts = {"train": Dataset.from_list(rows[:17]), "test": Dataset.from_list(rows[17:19])}
    if split is None:
        if streaming:
            return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in parts.items()})
        return DatasetDict(parts)
    match = re.fullmatch(r"(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?", split.replace(" ", ""))
    if not match or match.group(1) not in parts:
        raise ValueError(f'Unknown split "{split}". Should be one of {list(parts)}.')
    ds = parts[match.group(1)]
    if match.group(0) != match.group(1):
        n = len(ds)

        def bound(value, pct, default):
            if value == "":
                return default
            v = int(value)
            return round(n * v / 100) if pct else v

        lo, hi = bound(match.group(2), match.group(3), 0), bound(match.group(4), match.group(5), n)
        ds = ds.select(range(n)[lo:hi])
    return ds.to_iterable_dataset() if streaming else ds


if __name__ == "__main__":
    import sys

    print(json.dumps(build_hub_cache(sys.argv[1]), indent=1))
