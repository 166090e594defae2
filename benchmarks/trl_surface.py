"""Generate docs/TRL-COMPAT.md: TRL 1.16's public surface against posttrain's, from code.

    python benchmarks/trl_surface.py            # rewrite docs/TRL-COMPAT.md
    python benchmarks/trl_surface.py --check    # exit 1 when the committed file is stale

Compared: the names `from trl import …` offers (and `trl.rewards`, the merge callback), TRL's module paths (with
`trl` → `posttrain`), every trainer config's `dataclasses.fields` (TRL's own fields and the TrainingArguments
defaults it overrides; name and default) and every trainer constructor's `inspect.signature` (the arguments our
trainers accept: the explicit parameters along the class chain). Each item is marked present, different (with the
reason from REASONS, a hand-kept table of decisions), not applicable (reason from REASONS) or missing. A default
that differs without a recorded reason is listed as different with "no reason recorded": record one or match TRL.

Needs TRL (`pip install -e '.[parity]'`); tests/test_trl_surface.py regenerates the text and compares it with the
committed file. The library itself never imports TRL.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "TRL-COMPAT.md")

# (TRL config, TRL trainer, posttrain config, posttrain trainer); a posttrain side that is not there is "missing".
TRAINERS = {
    "SFT": ("trl:SFTConfig", "trl:SFTTrainer", "posttrain:SFTConfig", "posttrain:SFTTrainer"),
    "DPO": ("trl:DPOConfig", "trl:DPOTrainer", "posttrain:DPOConfig", "posttrain:DPOTrainer"),
    "Reward": ("trl:RewardConfig", "trl:RewardTrainer", "posttrain:RewardConfig", "posttrain:RewardTrainer"),
    "KTO": ("trl:KTOConfig", "trl:KTOTrainer", "posttrain:KTOConfig", "posttrain:KTOTrainer"),
    "GRPO": ("trl:GRPOConfig", "trl:GRPOTrainer", "posttrain:GRPOConfig", "posttrain:GRPOTrainer"),
    "RLOO": ("trl:RLOOConfig", "trl:RLOOTrainer", "posttrain:RLOOConfig", "posttrain:RLOOTrainer"),
    "ORPO": ("trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer", "posttrain:ORPOConfig",
             "posttrain:ORPOTrainer"),
    "CPO": ("trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer", "posttrain:CPOConfig",
            "posttrain:CPOTrainer"),
    "OnlineDPO": ("trl.experimental.online_dpo:OnlineDPOConfig", "trl.experimental.online_dpo:OnlineDPOTrainer",
                  "posttrain:OnlineDPOConfig", "posttrain:OnlineDPOTrainer"),
    "GKD": ("trl.experimental.gkd:GKDConfig", "trl.experimental.gkd:GKDTrainer",
            "posttrain.configs.distillation:GKDConfig", "posttrain.trainers.distillation:GKDTrainer"),
    "Distillation": ("trl:DistillationConfig", "trl:DistillationTrainer",
                     "posttrain.configs.distillation:DistillationConfig",
                     "posttrain.trainers.distillation:DistillationTrainer"),
}
SCRIPT_CONFIGS = {"ModelConfig": ("trl:ModelConfig", "posttrain:ModelConfig"),
                  "ScriptArguments": ("trl:ScriptArguments", "posttrain:ScriptArguments"),
                  "DatasetMixtureConfig": ("trl:DatasetMixtureConfig", "posttrain:DatasetMixtureConfig"),
                  "DatasetConfig": ("trl.scripts.utils:DatasetConfig", "posttrain.configs.script:DatasetConfig")}
EXTRA_NAMES = {  # names TRL users import from elsewhere than `trl`: TRL module → (posttrain module, names)
    "trl.rewards": ("posttrain.rewards", ["accuracy_reward", "get_cosine_scaled_reward",
                                          "get_repetition_penalty_reward", "get_soft_overlong_punishment",
                                          "reasoning_accuracy_reward", "think_format_reward"]),
    "trl.experimental.merge_model_callback": ("posttrain.callbacks", ["MergeConfig", "MergeModelCallback"]),
    "trl.experimental.utils": ("posttrain.experimental.utils", ["truncate_dataset", "create_reference_model"]),
}

# Decisions, by key: "name", "module path", "<Trainer>.<field>" (config; "*.<field>" for every trainer) or
# "<Trainer>(<argument>)".
# ("different" | "n/a", reason). Keep each reason to one line.
REASONS: dict[str, tuple[str, str]] = {
    "RichProgressCallback": ("n/a", "posttrain shows its own progress line and writes report.html"),
    "WeaveCallback": ("n/a", "W&B Weave tracing is not integrated; report_to=wandb logs metrics and tables"),
    "init_zero_verbose": ("n/a", "logging setup of TRL's own CLI; `posttrain` prints one-line errors itself"),
    "extract_prompt": ("different", "standard rows split at whitespace so no word is cut (TRL moves one space)"),
    "pack_dataset": ("different", "bfd packs the whole dataset at once (TRL: per 1000 rows); map_kwargs: desc only"),
    "get_training_chat_template": ("different", "adds {% generation %} to the model's own template (any template that "
                                                "renders turn by turn; a turn ends at its EOS) instead of TRL's "
                                                "per-family copies; Qwen3/DeepSeek-R1/GPT-OSS/Phi-3 refused"),
    "add_response_schema": ("different", "ChatML templates with Hermes <tool_call> JSON (Qwen 2.5/3, VL, "
                                         "chatml-tools), found by rendering; a shipped response_template is kept"),
    "maybe_convert_to_chatml": ("different", "ShareGPT speakers become roles (human → user, gpt → assistant)"),
    "accuracy_reward": ("different", "plain numeric gold answers keep number matching for plain-text completions "
                                     "(TRL scores '#### 12' 0); bare-LaTeX gold retried as $…$ (TRL: None)"),
    "MergeConfig": ("different", "linear and slerp merged in-process; ties/dare_ties (mergekit) refused"),
    "MergeModelCallback": ("different", "no mergekit; without a final checkpoint it writes output_dir/merged"),
    "GKD.max_new_tokens": ("different", "TRL's name for max_completion_length (default 128 there, as TRL's); None "
                                        "= use that field"),
    "GKD.shuffle_dataset": ("different", "shuffles the sampler's order; TRL's GKD batches are shuffled by the "
                                         "Trainer's sampler too (its shuffle_dataset is SFT's extra pre-shuffle)"),
    "SFT.padding_free": ("different", "None = chosen per run: on with packed attention and sdpa (1.36x the "
                                      "padded step on SmolLM2, benchmarks/RESULTS-smollm2.md)"),
    "KTO.train_sampling_strategy": ("different", "mismatched KL pairs are built per batch, so the sampler may "
                                                 "shuffle; 'sequential' reproduces TRL's pairs (configs/kto.py)"),
    "OnlineDPO.max_new_tokens": ("different", "TRL's name for max_completion_length; None = use that field"),
    "GKD.max_new_tokens": ("different", "TRL's name for max_completion_length (default 128 here too); None = use "
                                        "that field"),
    "GKD.shuffle_dataset": ("different", "the prompt sampler's shuffle (TRL's GKD skips SFT's pre-shuffle and its "
                                         "Trainer sampler shuffles anyway: the same order behaviour)"),
    "*.gradient_checkpointing": ("different", "off unless set: faster steps, more activation memory; a one-time "
                                              "note says so (trainers/base.py)"),
}
# SFT options TRL's GKDConfig inherits and its GKDTrainer never reads: posttrain accepts the default only
REASONS.update({f"GKD.{name}": ("different", "ignored by TRL's GKDTrainer (no SFT preparation): only the default "
                                             "is accepted")
                for name in ("dataset_text_field", "dataset_kwargs", "packing", "packing_strategy", "padding_free",
                             "eval_packing", "completion_only_loss", "assistant_only_loss", "loss_type",
                             "truncation_mode")})

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _load(spec: str):
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "<required>"


def _show(value) -> str:
    text = _ADDRESS.sub("", repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                        and not isinstance(a, bool) and a == b)
    except Exception:  # noqa: BLE001 - odd defaults that do not compare
        return repr(a) == repr(b)


def _status(key: str, found: bool, note: str = "") -> tuple[str, str]:
    """(status, note) for one item: a recorded decision wins; else present / different (note) / missing."""
    if key not in REASONS and "." in key and not key.startswith("trl"):
        key = "*." + key.split(".", 1)[1]
    if key in REASONS:
        kind, reason = REASONS[key]
        if kind == "n/a":
            return "not applicable", reason
        if found:
            return "different", reason + (f" ({note})" if note else "")
    if not found:
        return "missing", ""
    if note:
        return "different", f"{note}; no reason recorded"
    return "present", ""


def compare_names() -> list[tuple[str, str, str]]:
    import trl

    import posttrain

    rows = []
    for name in sorted(n for n in dir(trl) if not n.startswith("_") and not inspect.ismodule(getattr(trl, n))):
        rows.append((name, *_status(name, hasattr(posttrain, name))))
    for module, (ours, names) in EXTRA_NAMES.items():
        rows += [(f"{module}.{name}", *_status(name, hasattr(importlib.import_module(ours), name))) for name in names]
    return rows


def _trl_module_paths() -> list[str]:
    import trl

    base = os.path.dirname(trl.__file__)
    paths = ["trl.data_utils", "trl.chat_template_utils", "trl.scripts.utils", "trl.models.utils"]
    for folder in ("trainer", "rewards"):
        paths += [f"trl.{folder}.{f[:-3]}" for f in os.listdir(os.path.join(base, folder))
                  if f.endswith(".py") and not f.startswith("_")]
    experimental = os.path.join(base, "experimental")
    for entry in os.listdir(experimental):
        if entry.endswith(".py") and not entry.startswith("_"):
            paths.append(f"trl.experimental.{entry[:-3]}")
        elif os.path.isfile(os.path.join(experimental, entry, "__init__.py")):
            paths.append(f"trl.experimental.{entry}")
            paths += [f"trl.experimental.{entry}.{f[:-3]}" for f in os.listdir(os.path.join(experimental, entry))
                      if f.endswith(("_trainer.py", "_config.py"))]
    return sorted(set(paths))


def _importable(path: str) -> bool:
    try:
        importlib.import_module(path)
        return True
    except ImportError:
        return False


def compare_modules() -> list[tuple[str, str, str]]:
    return [(path, *_status(path, _importable(path.replace("trl", "posttrain", 1)))) for path in _trl_module_paths()]


def _own_fields(config_cls) -> dict[str, object]:
    """TRL's fields that are not TrainingArguments' own unchanged: name → default."""
    from transformers import TrainingArguments

    base = {f.name: _default(f) for f in dataclasses.fields(TrainingArguments) if f.init}
    out = {}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        value = _default(f)
        if f.name not in base or not _same(value, base[f.name]):
            out[f.name] = value
    return out


def compare_config(label: str, theirs, ours) -> list[tuple[str, str, str]]:
    mine = {f.name: _default(f) for f in dataclasses.fields(ours) if f.init} if ours is not None else {}
    rows = []
    for name, value in sorted(_own_fields(theirs).items()):
        note = "" if name not in mine or _same(value, mine[name]) else \
            f"default: TRL {_show(value)}, posttrain {_show(mine[name])}"
        rows.append((name, *_status(f"{label}.{name}", name in mine, note)))
    return rows


def _accepted_arguments(trainer_cls) -> set[str]:
    """The keyword arguments a posttrain trainer takes explicitly: parameters of each __init__ along its classes."""
    names: set[str] = set()
    for cls in trainer_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls.__module__.startswith("transformers"):
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and param.name != "self":
                names.add(param.name)
    return names


def compare_signature(label: str, theirs, ours) -> list[tuple[str, str, str]]:
    accepted = _accepted_arguments(ours) if ours is not None else set()
    params = [p for p in inspect.signature(theirs.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [(p.name, *_status(f"{label}({p.name})", p.name in accepted)) for p in params]


def _counts(rows) -> dict[str, int]:
    out = {"present": 0, "different": 0, "not applicable": 0, "missing": 0}
    for _, status, _ in rows:
        out[status] += 1
    return out


def _section(title: str, rows, what: str) -> list[str]:
    lines = [f"### {title}", ""]
    present = [name for name, status, _ in rows if status == "present"]
    if present:
        lines += [f"Present ({len(present)}): " + ", ".join(f"`{n}`" for n in present), ""]
    others = [r for r in rows if r[1] != "present"]
    if others:
        lines += [f"| {what} | status | note |", "|---|---|---|"]
        lines += [f"| `{name}` | {status} | {note} |" for name, status, note in others]
        lines.append("")
    return lines


def render() -> str:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import trl

    sections: list[tuple[str, str, list]] = [("Names: `from trl import …`", "name", compare_names()),
                                            ("Module paths (`trl` → `posttrain`)", "module", compare_modules())]
    for label, (theirs, ours) in SCRIPT_CONFIGS.items():
        sections.append((f"{label} fields", "field", compare_config(label, _load(theirs), _load(ours))))
    for label, (tc, tt, oc, ot) in TRAINERS.items():
        their_config, their_trainer = _load(tc), _load(tt)
        if their_config is None:
            continue
        sections.append((f"{label}: {their_config.__name__} fields", "field",
                         compare_config(label, their_config, _load(oc))))
        sections.append((f"{label}: {their_trainer.__name__} arguments", "argument",
                         compare_signature(label, their_trainer, _load(ot))))
    lines = ["# posttrain against TRL's public surface", "",
             f"Generated by `python benchmarks/trl_surface.py` from TRL {trl.__version__} and this checkout; do not "
             "edit by hand (tests/test_trl_surface.py fails when it is stale). Configs compare TRL's own fields and "
             "the TrainingArguments defaults TRL overrides, by name and default; constructors compare TRL's keyword "
             "arguments with the ones posttrain's trainers take. *different* = present with another default or "
             "behaviour (the reason is the decision recorded in the script's REASONS table); *not applicable* = "
             "deliberately absent; *missing* = not there yet. posttrain's own extras (PPOTrainer — TRL 1.16 has no "
             "PPO —, fields TRL lacks) are not listed.", "",
             "## Summary", "", "| surface | present | different | not applicable | missing |", "|---|---|---|---|---|"]
    for title, _, rows in sections:
        c = _counts(rows)
        lines.append(f"| {title} | {c['present']} | {c['different']} | {c['not applicable']} | {c['missing']} |")
    lines += ["", "## Details", ""]
    for title, what, rows in sections:
        lines += _section(title, rows, what)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/TRL-COMPAT.md is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    text = render()
    if args.check:
        current = open(DOC).read() if os.path.exists(DOC) else ""
        if current != text:
            print("docs/TRL-COMPAT.md is stale: run python benchmarks/trl_surface.py")
            return 1
        return 0
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
