"""What TRL's training scripts import besides trainers and configs: `TrlParser` (dataclass arguments from the
command line and a `--config` YAML file), `get_dataset` (a `DatasetMixtureConfig` loaded), `get_peft_config`,
`get_quantization_config`, `get_kbit_device_map`.

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

Precedence: dataclass defaults < YAML values < command-line flags. The YAML's `env` mapping is exported to the
environment. Unknown YAML keys are an error naming the closest field (`fail_with_unknown_args=False` hands them
back instead). Older option names (`max_seq_length`, `evaluation_strategy`, …) are translated as everywhere else.
Parsed beside a `DatasetMixtureConfig` (as TRL's scripts do), `ScriptArguments` leaves the `datasets` key to it.

Not here: the `posttrain` command line itself (`cli.py`, which parses the same way with one-line errors).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from posttrain.configs.script import ScriptArguments
from posttrain.errors import UserError, did_you_mean


@dataclass
class _ScriptArgumentsBesideMixture(ScriptArguments):
    """ScriptArguments whose `datasets` key belongs to the DatasetMixtureConfig parsed beside it."""

    datasets: list[dict] | None = field(default=None, init=False)


class TrlParser(HfArgumentParser):
    """`transformers.HfArgumentParser` that also reads `--config file.yaml` (see the module docstring)."""

    def __init__(self, dataclass_types=None, **kwargs: Any):
        if dataclass_types is None:
            dataclass_types = []
        elif not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        from posttrain.configs.script import DatasetMixtureConfig

        dataclass_types = list(dataclass_types)
        if DatasetMixtureConfig in dataclass_types and ScriptArguments in dataclass_types:
            dataclass_types[dataclass_types.index(ScriptArguments)] = _ScriptArgumentsBesideMixture
        for cls in dataclass_types:
            if "config" in getattr(cls, "__dataclass_fields__", {}):
                raise ValueError(f"Dataclass {cls.__name__} has a field named 'config', which TrlParser reserves for "
                                 "the YAML file path; rename the field.")
        super().__init__(dataclass_types=dataclass_types, **kwargs)
        from posttrain.configs.base import accept_bf16_auto

        accept_bf16_auto(self)  # --bf16 auto: bf16 wherever the hardware runs it natively

    def parse_args_and_config(self, args: Iterable[str] | None = None, return_remaining_strings: bool = False,
                              fail_with_unknown_args: bool = True, separate_remaining_strings: bool = False):
        """One instance per dataclass type, from `args` (default sys.argv[1:]) and the `--config` YAML file.

        With return_remaining_strings, the strings neither consumed are returned last (YAML leftovers as
        `--key value` pairs first, then command-line ones; separate_remaining_strings returns the two lists apart).
        """
        from posttrain.compat import translate_legacy_arguments, translate_legacy_flags
        from posttrain.yaml_files import read_mapping

        args = list(sys.argv[1:] if args is None else args)
        config_leftovers: list[str] = []
        if "--config" in args:
            at = args.index("--config")
            if at + 1 >= len(args):
                raise UserError("--config needs a YAML file path after it.")
            path = args[at + 1]
            del args[at:at + 2]
            config = translate_legacy_arguments(dict(read_mapping(path, "config file", "a mapping of option: value",
                                                                  UserError)), "config")
            env = config.pop("env", None) or {}
            if not isinstance(env, dict):
                raise UserError(f"`env` in {path} must be a mapping of NAME: value, got {type(env).__name__}.")
            for name, value in env.items():
                os.environ[str(name)] = str(value)
            config_leftovers = self.set_defaults_with_config(**config)
            if config_leftovers and fail_with_unknown_args and not return_remaining_strings:
                known = sorted(a.dest for a in self._actions)
                key = config_leftovers[0].lstrip("-")
                raise UserError(f"unknown key '{key}' in {path}{did_you_mean(key, known)} (or pass "
                                "fail_with_unknown_args=False to get the unknown keys back).")
        args = translate_legacy_flags(args)
        output = self.parse_args_into_dataclasses(args=args, return_remaining_strings=return_remaining_strings)
        if not return_remaining_strings:
            return output
        remaining = output[-1]
        if separate_remaining_strings:
            return (*output[:-1], config_leftovers, remaining)
        return (*output[:-1], config_leftovers + remaining)

    def set_defaults_with_config(self, **values: Any) -> list[str]:
        """Make `values` the defaults of the matching arguments (also in subparsers; a required argument given a
        value stops being required). Returns the unmatched ones as `--key value` strings."""
        import argparse
        import json

        def apply(parser) -> set[str]:
            used = set()
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for sub in action.choices.values():
                        used |= apply(sub)
                elif action.dest in values:
                    value = values[action.dest]
                    # argparse applies `type` to string defaults only; JSON-typed fields take mappings as text
                    action.default = json.dumps(value) if isinstance(value, dict) else value
                    action.required = False
                    used.add(action.dest)
            return used

        used = apply(self)
        return [item for key, value in values.items() if key not in used for item in (f"--{key}", str(value))]


def get_dataset(mixture):
    """A DatasetDict ("train", plus "test" when mixture.test_split_size is set) from a `DatasetMixtureConfig`: each
    dataset loaded (built-in names, local files and Hub ids, as everywhere in posttrain), its `columns` selected,
    then concatenated, with `fraction`s as shares (`data.loading.load_mixture`)."""
    from posttrain.configs.script import DatasetMixtureConfig
    from posttrain.data.loading import load_mixture

    if not isinstance(mixture, DatasetMixtureConfig):
        raise UserError(f"get_dataset takes a DatasetMixtureConfig (parse one beside ScriptArguments with TrlParser), "
                        f"got {type(mixture).__name__}.")
    return load_mixture(mixture)  # an empty mixture is its one-line error


def get_peft_config(model_args):
    """`peft.LoraConfig` from a ModelConfig's LoRA options when use_peft, else None (LoRA options without use_peft
    are an error: they would silently train every weight)."""
    return model_args.peft_config()


def get_quantization_config(model_args):
    """`transformers.BitsAndBytesConfig` for a ModelConfig's load_in_4bit / load_in_8bit, else None."""
    return model_args.quantization_config()


def get_kbit_device_map() -> dict[str, int] | None:
    """{"": this process's local GPU index} for k-bit loading (each process holds its whole quantised model), or
    None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}
