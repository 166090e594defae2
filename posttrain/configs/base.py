"""The shared config base: `transformers.TrainingArguments` plus what every posttrain trainer adds.

Lives here: `PostTrainConfig` (defaults that differ from TrainingArguments, machine-aware precision, deprecated
aliases, validation helpers). Not here: per-trainer options (one module per trainer) and model/dataset options
(`configs/script.py`), which the CLI parses beside the trainer config.

A YAML key, a CLI flag and the attribute share one name. Every config class is decorated with `posttrain_config`:
TrainingArguments names that transformers removed keep working with one warning naming the modern form
(`compat`), and an option the config does not take is refused in one line that names the trainers taking it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from posttrain import hardware
from posttrain.compat import translate_legacy_arguments
from posttrain.errors import UserError, UserTypeError, did_you_mean

CHUNKED_LM_HEAD = ("auto", "true", "false")


def json_option(value, name: str):
    """A mapping option given as a JSON string (the command line's form) parsed; other values unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{name} must be a JSON object, got {value!r} ({e}).") from None


def check(condition: bool, message: str) -> None:
    """Raise a one-line `UserError` (a ValueError) when a config value is invalid (message says what and how to fix)."""
    if not condition:
        raise UserError(message)


def check_bounds(config, *rules: str) -> None:
    """`check` for numeric options, one rule each — "temperature > 0", "num_iterations >= 1", "top_k >= 1 or None"
    (None passes) — each failing with one line: "temperature must be > 0, got 0.0."."""
    for rule in rules:
        name, bound = rule.split(" ", 1)
        op, limit, *or_none = bound.split(" ", 2)
        value = getattr(config, name)
        if not (value is None and or_none):
            check(value > float(limit) if op == ">" else value >= float(limit), f"{name} must be {bound}, got {value}.")


def max_tokens_per_backward_field(unit: str):
    """The `max_tokens_per_backward` option of the configs whose trainers slice a micro-batch (`trainers/slices.py`);
    `unit`: what a slice is made of (rows, pairs)."""
    return field(default=None, metadata={"help": f"Run each micro-batch's forward and backward in slices of whole "
                                         f"{unit} of at most this many tokens (padding excluded; a longer one is a "
                                         "slice alone): the same update, the activations of one slice in memory at "
                                         "a time. None: the whole micro-batch at once."})


def _check_max_tokens_per_backward(config) -> None:
    """The refusals of every config that has `max_tokens_per_backward` (`max_tokens_per_backward_field`)."""
    value = getattr(config, "max_tokens_per_backward", None)
    if value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"max_tokens_per_backward must be a positive number of tokens or None, got {value!r}.")
    check(not config.deepspeed, "max_tokens_per_backward runs several backward passes per micro-batch, which "
                                "DeepSpeed's engine does not allow (it counts one per micro-step); lower "
                                "per_device_train_batch_size (and raise gradient_accumulation_steps) instead.")


# report_to integration → the package it needs (transformers fails deep inside Trainer without it)
_INTEGRATION_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                         "clearml": "clearml", "neptune": "neptune", "trackio": "trackio", "swanlab": "swanlab",
                         "dvclive": "dvclive", "aim": "aim"}


def _check_report_to(report_to) -> None:
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = _INTEGRATION_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            extra = f"'posttrain[{name}]'" if name in ("wandb", "tensorboard") else package
            raise UserError(f"report_to={name!r} needs the {package} package, which is not installed: pip install "
                            f"{extra}, or choose another report_to (e.g. none).")


# Every config module, so that an option refused by one config can name the configs that take it.
CONFIG_MODULES = ("sft", "dpo", "reward", "kto", "cpo", "grpo", "rloo", "online_dpo", "ppo", "distillation")


def option_names(config_cls) -> set[str]:
    """The keyword arguments `config_cls(...)` takes (fields and deprecated InitVar names)."""
    return set(inspect.signature(config_cls).parameters)


def configs_taking(name: str) -> list[type]:
    """The posttrain config classes (one per trainer) that take option `name`."""
    for module in CONFIG_MODULES:
        importlib.import_module(f"posttrain.configs.{module}")
    found, todo = [], list(PostTrainConfig.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls.__name__.endswith("Config") and name in option_names(cls) \
                and cls.__module__.rsplit(".", 1)[-1] in CONFIG_MODULES and cls not in found:
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def unknown_option_message(owner: str, name: str, known, config_cls=None) -> str:
    """"X has no option 'n'": naming the trainers that take it, or the closest known name."""
    takers = [c.__name__.replace("Config", "Trainer") for c in configs_taking(name) if c is not config_cls]
    if takers:
        return (f"{owner} has no option '{name}': it is used by {', '.join(takers)} only; remove it "
                f"(it would have no effect here).")
    return f"{owner} got an unexpected option '{name}'{did_you_mean(name, known)}"


def posttrain_config(cls):
    """Class decorator of every posttrain config: removed TrainingArguments names are translated (one warning each,
    `compat`), and an option this config does not take is a one-line `UserTypeError`."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if type(self) is cls:
            translate_legacy_arguments(kwargs, cls.__name__)
            older_forms = getattr(cls, "translate_legacy_options", None)  # e.g. TRL's older PPOConfig names
            if older_forms is not None:
                older_forms(kwargs)
            known = option_names(cls)
            for name in kwargs:
                if name not in known:
                    raise UserTypeError(unknown_option_message(cls.__name__, name, known, cls))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def bf16_value(value: Any) -> bool | str:
    """The `bf16` option from YAML or the command line: a bool, or "auto" (bf16 where the hardware runs it
    natively). One-line error for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "y", "1", "on"):
        return True
    if text in ("false", "no", "n", "0", "off"):
        return False
    raise UserError(f"bf16 must be true, false or auto, got {value!r}.")


def accept_bf16_auto(parser) -> None:
    """Let an HfArgumentParser's --bf16 take "auto" besides true/false (its bool type would refuse it), and stand
    alone for true as TrainingArguments' --bf16 does (a None default would otherwise demand a value)."""
    for action in parser._actions:
        if action.dest == "bf16":
            action.type, action.nargs, action.const = bf16_value, "?", True


@posttrain_config
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
                              "bf16, off on CPUs (emulated bf16 is ~30x slower there). 'auto': on wherever bf16 is "
                              "native, CPUs with AVX512-BF16/AMX included."})
    model_init_kwargs: dict | str | None = field(default=None, metadata={"help": "Keyword arguments for "
                                                 "`from_pretrained` when the model is given as a name or path "
                                                 "(JSON string on the command line), e.g. '{\"dtype\": \"bfloat16\"}'."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let a model or tokenizer loaded by name run "
                                    "the code its repository ships (passed to `from_pretrained`)."})
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability in the model to 0."})
    activation_offloading: bool = field(default=False, metadata={"help": "Keep the activations saved for the "
                                        "backward in (pinned) CPU memory instead of GPU memory during the training "
                                        "forward. GPU only: refused when the run trains on the CPU, where they "
                                        "already are."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Mixture-of-Experts models: weight of "
                                               "the router load-balancing loss added to the training loss (the "
                                               "model returns it when its config has output_router_logits). "
                                               "Default: the model config's own coefficient; 0 turns it off. "
                                               "Refused for a model without a router."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Continue a run: a checkpoint "
                                               "directory, a run directory (its newest complete checkpoint), "
                                               "'latest' (the newest in output_dir; error if none) or 'auto' "
                                               "(the same, or a fresh start)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete the checkpoints an earlier run left "
                                       "in output_dir before training. Without it a fresh run refuses an output_dir "
                                       "that holds checkpoints (resume it, or choose another output_dir), so two "
                                       "runs' checkpoints never mix."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "A step whose loss or gradient is NaN/inf is "
                                     "skipped (no weight changes; counted as `nonfinite_skipped`); after this many "
                                     "in a row the run stops with an error. 0 = skip but never stop."})
    chunked_lm_head: str = field(default="auto", metadata={"help": "Run the LM head and log-softmax of the "
                                 "training pass in chunks of trained tokens (≤ 1,024, ≤ 256 MiB of logits) under activation checkpointing, so "
                                 "its memory stops growing with tokens × vocabulary (costs one more head matmul). "
                                 "auto: when the float32 (trained tokens × vocabulary) softmax would exceed 1 GiB; "
                                 "true: always; false: never.", "choices": list(CHUNKED_LM_HEAD)})

    lean_layers: bool = field(default=True, metadata={"help": "Run the RMSNorm and SwiGLU MLP layers of "
                              "Llama/Qwen2/Mistral-style models through functions that keep fewer activations for "
                              "the backward and recompute their element-wise parts (no matmul is recomputed): the "
                              "same results with less memory (SmolLM2-135M: ~4,200 of ~11,000 saved floats per "
                              "token fewer). Off under DeepSpeed/FSDP."})

    packed_attention: bool = field(default=True, metadata={"help": "Give a model under sdpa attention the "
                                   "packed attention (one causal SDPA call per document of a packed row), and run "
                                   "padded log-prob batches as one row without their padding when that saves more "
                                   "than the shared prompt would: same results, fewer tokens through the model "
                                   "(SFT: padding_free is on by default with it)."})

    freeze_vision_tower: bool = field(default=False, metadata={"help": "Vision-language models: train no parameter "
                                      "of the vision encoder (trainers/vision.py)."})

    def __post_init__(self) -> None:
        self.model_init_kwargs = json_option(self.model_init_kwargs, "model_init_kwargs")
        if isinstance(self.chunked_lm_head, bool):  # Python and YAML callers may pass a bool
            self.chunked_lm_head = "true" if self.chunked_lm_head else "false"
        self.chunked_lm_head = str(self.chunked_lm_head).lower()
        check(self.chunked_lm_head in CHUNKED_LM_HEAD, f"chunked_lm_head must be auto, true or false, got "
              f"{self.chunked_lm_head!r}.")
        check(self.gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1, got "
                                                      f"{self.gradient_accumulation_steps}.")
        check(self.max_steps != 0, "max_steps is 0: nothing would be trained. Give a positive number of optimizer "
                                   "steps, or -1 to train for num_train_epochs.")
        check(not self.fp16 or hardware.has_cuda(), "fp16=True needs a CUDA GPU (this machine has none; CPU "
                                                    "training runs in float32). Remove --fp16.")
        _check_report_to(self.report_to)
        if isinstance(self.bf16, str):  # YAML / command line: true, false or auto
            self.bf16 = bf16_value(self.bf16)
        if self.bf16 == "auto":  # bf16 wherever the hardware runs it natively (a CPU with AVX512-BF16/AMX too)
            self.bf16 = not self.fp16 and not hardware.bf16_is_slow_here(self.use_cpu)
        elif self.bf16 is None:
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
        check(self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
              f"router_aux_loss_coef must be >= 0 (0 turns the router loss off), got {self.router_aux_loss_coef}.")
        check(self.max_nonfinite_steps >= 0, f"max_nonfinite_steps must be >= 0 (0 = never stop), got "
              f"{self.max_nonfinite_steps}.")
        _check_max_tokens_per_backward(self)
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
            value = plain_value(value)
            if isinstance(value, (str, int, float, bool, type(None), list, dict)):
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """TrainingArguments' dict (what `to_json_string`, checkpoints and loggers write), with objects inside
        mappings such as `model_init_kwargs={"dtype": torch.float16}` written as their names."""
        return {k: plain_value(v) for k, v in super().to_dict().items()}


def plain_value(value):
    """`value` with torch dtypes (anywhere inside lists and dicts) as their names ("float16"), so JSON and YAML
    can write it; other values unchanged."""
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(v) for v in value)
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return value
