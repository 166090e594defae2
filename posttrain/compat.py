"""Older call forms that published guides still show, kept working with one deprecation message each.

- `Trainer(tokenizer=…)` → `processing_class=`;
- config options passed straight to a trainer (`max_seq_length=`, `packing=`, `learning_rate=`, `max_steps=`, …)
  → moved into the trainer's config;
- `args=` given as a plain `transformers.TrainingArguments` → converted to the trainer's config;
- `TrainingArguments(evaluation_strategy=…)` (renamed `eval_strategy` in transformers) → accepted.

Not here: deprecated config field names (each config maps its own aliases in `__post_init__`).
"""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import fields
from typing import Any


def _warn(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=4)


def resolve_trainer_arguments(trainer_name: str, config_cls, args, processing_class, kwargs: dict[str, Any]):
    """Return (config, processing_class) after folding legacy keyword arguments into them."""
    if "tokenizer" in kwargs:
        tokenizer = kwargs.pop("tokenizer")
        if processing_class is None:
            processing_class = tokenizer
        _warn(f"{trainer_name}(tokenizer=...) is deprecated; use {trainer_name}(processing_class=...).")
    names = {f.name for f in fields(config_cls) if f.init}
    moved = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if kwargs:
        bad = next(iter(kwargs))
        close = difflib.get_close_matches(bad, sorted(names) + ["processing_class", "peft_config", "tokenizer"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise TypeError(f"{trainer_name} got an unexpected keyword argument '{bad}'.{hint}")
    config_name = config_cls.__name__
    if moved:
        listed = ", ".join(f"{k}=..." for k in moved)
        _warn(f"Passing {listed} straight to {trainer_name} is deprecated; pass them in "
              f"args={config_name}({listed}).")
    if args is None:
        return config_cls(**moved), processing_class
    if not isinstance(args, config_cls):
        _warn(f"args= as a {type(args).__name__} is deprecated for {trainer_name}; use args={config_name}(...) "
              "(it accepts every TrainingArguments field).")
    elif not moved:
        return args, processing_class
    if getattr(args, "_output_dir_was_default", False):
        moved.setdefault("output_dir", None)
    return config_cls.from_training_arguments(args, **moved), processing_class


def install_training_arguments_aliases() -> None:
    """Let `transformers.TrainingArguments(evaluation_strategy=…)` work, as the guides write it."""
    from transformers import TrainingArguments

    init = TrainingArguments.__init__
    if getattr(init, "_posttrain_alias", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "evaluation_strategy" in kwargs and type(self) is TrainingArguments:
            warnings.warn("`evaluation_strategy` is deprecated; use `eval_strategy`.", FutureWarning, stacklevel=2)
            kwargs.setdefault("eval_strategy", kwargs.pop("evaluation_strategy"))
        init(self, *args, **kwargs)

    __init__._posttrain_alias = True
    TrainingArguments.__init__ = __init__
