"""Older call forms that published guides still show, kept working with one deprecation message each. Nothing in
the training path imports from here except the trainer constructor (`resolve_trainer_arguments`) and the config
decorator (`translate_legacy_arguments`); each older form is translated at the door into the modern one.

- `Trainer(tokenizer=…)` → `processing_class=`;
- config options passed straight to a trainer (`max_seq_length=`, `packing=`, `learning_rate=`, `max_steps=`, …)
  → moved into the trainer's config;
- `args=` given as a plain `transformers.TrainingArguments` → converted to the trainer's config;
- TrainingArguments options that transformers 5 removed (`evaluation_strategy`, `warmup_ratio`, `no_cuda`, …) →
  accepted by `TrainingArguments` and every posttrain config, renamed to the current option or dropped.

- TRL's older PPO: `PPOConfig(batch_size=…, ppo_epochs=…, …)` and `PPOTrainer(config=…, dataset=…)` (`ppo.py`),
  and its loop API `dataloader` / `generate` / `step` / `log_stats` (`ppo_loop.py`, an adapter over the trainer).

`transformers.TrainingArguments` itself gets a thin constructor wrapper (`install_training_arguments_aliases`) when
a trainer or config is first taken from `posttrain` (`posttrain.__getattr__`; importing `posttrain` or any of its
modules patches nothing): the guides build `TrainingArguments(evaluation_strategy=…)` before any posttrain object
exists, so there is no later moment to translate it. The wrapper acts only when a removed name is passed (it renames
it, with one FutureWarning saying so); any other call runs transformers' own constructor with the same arguments.
`POSTTRAIN_LEGACY_TRAINING_ARGUMENTS=0` leaves transformers untouched, and
`uninstall_training_arguments_aliases()` restores the original constructor.

Not here: renamed options of one config (e.g. SFT's max_seq_length, in its `__post_init__`).
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from dataclasses import fields
from typing import Any

from posttrain.errors import UserError, UserTypeError


def deprecated(message: str, stacklevel: int = 4) -> None:
    """The one deprecation warning: a FutureWarning whose message names the modern form."""
    warnings.warn(message, FutureWarning, stacklevel=stacklevel)


def resolve_trainer_arguments(trainer_name: str, config_cls, args, processing_class, kwargs: dict[str, Any]):
    """Return (config, processing_class) after folding legacy keyword arguments into them."""
    if "tokenizer" in kwargs:
        tokenizer = kwargs.pop("tokenizer")
        if processing_class is None:
            processing_class = tokenizer
        deprecated(f"{trainer_name}(tokenizer=...) is deprecated; use {trainer_name}(processing_class=...).")
    translate_legacy_arguments(kwargs, trainer_name)
    names = {f.name for f in fields(config_cls) if f.init}
    moved = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if kwargs:
        bad = next(iter(kwargs))
        close = difflib.get_close_matches(bad, sorted(names) + ["processing_class", "peft_config", "tokenizer"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserTypeError(f"{trainer_name} got an unexpected keyword argument '{bad}'.{hint}")
    config_name = config_cls.__name__
    if moved:
        listed = ", ".join(f"{k}=..." for k in moved)
        deprecated(f"Passing {listed} straight to {trainer_name} is deprecated; pass them in "
                   f"args={config_name}({listed}).")
    if args is None:
        return config_cls(**moved), processing_class
    if not isinstance(args, config_cls):
        deprecated(f"args= as a {type(args).__name__} is deprecated for {trainer_name}; use args={config_name}(...) "
                   "(it accepts every TrainingArguments field).")
    elif not moved:
        return args, processing_class
    if getattr(args, "_output_dir_was_default", False):
        moved.setdefault("output_dir", None)
    return config_cls.from_training_arguments(args, **moved), processing_class


# TrainingArguments names that transformers 5 removed but guides still use: old → (new or None, note).
# A value moves to the new name; a None target means the option no longer has an effect and is dropped.
LEGACY_TRAINING_ARGUMENTS: dict[str, tuple[str | None, str]] = {
    "evaluation_strategy": ("eval_strategy", ""),
    "warmup_ratio": ("warmup_steps", " (a float in [0, 1) is a ratio of the total steps)"),
    "no_cuda": ("use_cpu", ""),
    "per_gpu_train_batch_size": ("per_device_train_batch_size", ""),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size", ""),
    "group_by_length": ("train_sampling_strategy", " (='group_by_length')"),
    "logging_dir": (None, ": set TENSORBOARD_LOGGING_DIR or the integration's own option"),
    "save_safetensors": (None, ": checkpoints are always safetensors"),
    "include_tokens_per_second": (None, ": use include_num_input_tokens_seen"),
}


def translate_legacy_arguments(kwargs: dict[str, Any], owner: str = "TrainingArguments") -> dict[str, Any]:
    """Rename/drop removed TrainingArguments options in `kwargs`, with one warning per option."""
    for old in [k for k in kwargs if k in LEGACY_TRAINING_ARGUMENTS]:
        new, note = LEGACY_TRAINING_ARGUMENTS[old]
        value = kwargs.pop(old)
        if new is None:
            deprecated(f"{owner}({old}=...) no longer exists{note}; it is ignored.")
            continue
        if old == "group_by_length":
            value = "group_by_length" if value else "random"
        if old == "warmup_ratio" and not 0 <= float(value) < 1:
            raise UserError(f"warmup_ratio must be in [0, 1) (a share of the training steps), got {value}; for a "
                            "number of steps use warmup_steps.")
        deprecated(f"`{old}` is deprecated; use `{new}`{note}.")
        kwargs.setdefault(new, value)
    return kwargs


def translate_legacy_flags(argv: list[str]) -> list[str]:
    """The same renames for command-line flags (`--warmup_ratio 0.1` → `--warmup_steps 0.1`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in LEGACY_TRAINING_ARGUMENTS:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            kwargs = translate_legacy_arguments({name: value or "True"}, "flag")
            for new, new_value in kwargs.items():
                out += [f"--{new}", str(new_value)]
        else:
            out.append(arg)
        i += 1
    return out


def install_training_arguments_aliases() -> bool:
    """Let `transformers.TrainingArguments(evaluation_strategy=…, warmup_ratio=…)` work, as the guides write it: its
    constructor (not its subclasses', posttrain's configs translate their own) accepts the removed names.

    Returns whether the wrapper is in place (False when POSTTRAIN_LEGACY_TRAINING_ARGUMENTS=0 turns it off)."""
    if os.environ.get("POSTTRAIN_LEGACY_TRAINING_ARGUMENTS", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    from transformers import TrainingArguments

    init = TrainingArguments.__init__
    if not getattr(init, "_posttrain_legacy", False):
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            if type(self) is TrainingArguments:
                translate_legacy_arguments(kwargs, "TrainingArguments")
            init(self, *args, **kwargs)

        __init__._posttrain_legacy = True
        TrainingArguments.__init__ = __init__
    return True


def uninstall_training_arguments_aliases() -> None:
    """Give `transformers.TrainingArguments` its own constructor back (posttrain's configs keep the aliases)."""
    from transformers import TrainingArguments

    init = TrainingArguments.__init__
    if getattr(init, "_posttrain_legacy", False):
        TrainingArguments.__init__ = init.__wrapped__
