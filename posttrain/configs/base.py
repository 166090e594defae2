"""The shared config base: `transformers.TrainingArguments` plus what every posttrain trainer adds.

Lives here: `PostTrainConfig` (defaults that differ from TrainingArguments, machine-aware precision, deprecated
aliases, validation helpers). Not here: per-trainer options (one module per trainer) and model/dataset options
(`configs/script.py`), which the CLI parses beside the trainer config.

A YAML key, a CLI flag and the attribute share one name. Deprecated names keep working with one warning
that names the modern form: each config class is decorated with `compat.accept_legacy_arguments`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from posttrain import hardware
from posttrain.compat import accept_legacy_arguments


CHUNKED_LM_HEAD = ("auto", "true", "false")


def check(condition: bool, message: str) -> None:
    """Raise a one-line ValueError when a config value is invalid (message says what and how to fix)."""
    if not condition:
        raise ValueError(message)


def warn_deprecated(old: str, new: str) -> None:
    warnings.warn(f"`{old}` is deprecated and will be removed; use `{new}` instead.", FutureWarning, stacklevel=4)


@accept_legacy_arguments
@dataclass
class PostTrainConfig(TrainingArguments):
    """Training options shared by every posttrain trainer (all of `transformers.TrainingArguments`, plus these).

    Defaults that differ from TrainingArguments: `logging_steps=10`; `bf16=None` resolves to True only on a GPU
    with native bf16 (never on a CPU that would emulate it ~30x slower); `output_dir=None` resolves to
    `<model name>-<Method>` when the trainer starts.
    """

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints, the final model and logs go. "
                                   "Default: '<model name>-<Method>'."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision. Default: on for GPUs with native "
                              "bf16, off on CPUs (emulated bf16 is ~30x slower there)."})
    model_init_kwargs: dict | str | None = field(default=None, metadata={"help": "Keyword arguments for "
                                                 "`from_pretrained` when the model is given as a name or path "
                                                 "(JSON string on the command line), e.g. '{\"dtype\": \"bfloat16\"}'."})
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability in the model to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Continue a run: a checkpoint "
                                               "directory, a run directory (its newest complete checkpoint), "
                                               "'latest' (the newest in output_dir; error if none) or 'auto' "
                                               "(the same, or a fresh start)."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "A step whose loss or gradient is NaN/inf is "
                                     "skipped (no weight changes; counted as `nonfinite_skipped`); after this many "
                                     "in a row the run stops with an error. 0 = skip but never stop."})
    chunked_lm_head: str = field(default="auto", metadata={"help": "Run the LM head and log-softmax of the "
                                 "training pass in chunks of trained tokens (≤ 1,024, ≤ 256 MiB of logits) under activation checkpointing, so "
                                 "its memory stops growing with tokens × vocabulary (costs one more head matmul). "
                                 "auto: when the float32 (trained tokens × vocabulary) softmax would exceed 1 GiB; "
                                 "true: always; false: never.", "choices": list(CHUNKED_LM_HEAD)})

    def __post_init__(self) -> None:
        if isinstance(self.model_init_kwargs, str):
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"model_init_kwargs must be a JSON object, got {self.model_init_kwargs!r} ({e}).")
        if isinstance(self.chunked_lm_head, bool):  # Python and YAML callers may pass a bool
            self.chunked_lm_head = "true" if self.chunked_lm_head else "false"
        self.chunked_lm_head = str(self.chunked_lm_head).lower()
        check(self.chunked_lm_head in CHUNKED_LM_HEAD, f"chunked_lm_head must be auto, true or false, got "
              f"{self.chunked_lm_head!r}.")
        if self.bf16 is None:
            self.bf16 = False if self.fp16 else hardware.default_bf16(self.use_cpu)
        elif self.bf16 and hardware.bf16_is_slow_here(self.use_cpu):
            warnings.warn("bf16=True on a device without native bf16 support: expect steps ~30x slower than fp32. "
                          "Leave bf16 unset to let posttrain choose.", UserWarning, stacklevel=3)
        if not hardware.has_cuda():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; avoids a warning per dataloader
            if hardware.is_multi_process_launch() or self.bf16:
                # several processes without a GPU: accelerate's multi-CPU mode (gloo); bf16 without a GPU: CPU
                # autocast (transformers refuses bf16 on a machine without a GPU unless use_cpu is set)
                self.use_cpu = True
        output_dir = self.output_dir
        if output_dir is None:
            self.output_dir = "trainer_output"  # placeholder; the trainer replaces it with '<model>-<Method>'
        super().__post_init__()
        self._output_dir_was_default = output_dir is None
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}.")
        check(self.max_nonfinite_steps >= 0, f"max_nonfinite_steps must be >= 0 (0 = never stop), got "
              f"{self.max_nonfinite_steps}.")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise ValueError via `check`."""

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides: Any):
        """Build this config from a plain `TrainingArguments` (older call form), keeping every value set there."""
        own = {f.name for f in fields(cls) if f.init}
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init and f.name in own}
        # TrainingArguments.__post_init__ rewrites a few fields; hand back the user-facing forms.
        for name in ("lr_scheduler_type", "optim", "eval_strategy", "save_strategy", "logging_strategy",
                     "hub_strategy", "save_safetensors"):
            if name in values and hasattr(values[name], "value"):
                values[name] = values[name].value
        values.update(overrides)
        return cls(**values)

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able values (the form `--config` accepts back)."""
        out = {}
        for f in fields(self):
            if not f.init or f.name.startswith("_") or f.name == "hub_token":
                continue
            value = getattr(self, f.name)
            if hasattr(value, "value"):
                value = value.value
            if isinstance(value, (str, int, float, bool, type(None), list, dict)):
                out[f.name] = value
        return out
