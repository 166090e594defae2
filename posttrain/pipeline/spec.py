"""The pipeline YAML format and how it becomes one resolved config per stage.

    output_dir: outputs/arith-pipeline        # stages write to OUTPUT_DIR/NAME unless they set output_dir
    evaluation:                                # after every policy stage (and of the starting model with base: true)
      dataset_name: posttrain/arith-prompts    # prompt + answer columns
      split: test
      num_prompts: 200
      max_new_tokens: 32
      base: true
      samples_per_prompt: 4                    # also sampled accuracy (4 per prompt at sampling_temperature),
                                               # each question's mean against the start model's (sign test)
      sampled_prompts: 100                     # ... on the first 100 questions only (default: all of them)
      drift_dataset: posttrain/chat-prompts    # also KL(starting model ‖ stage) on 200 prompts outside the task
    defaults: {report_to: none}                # applied to every stage (a stage's own keys win)
    stages:
      - name: sft                              # also the command when no `command` is given
        config: sft.yaml                       # a command's YAML (relative to this file); optional
        max_steps: 300                         # any other key overrides that command's option of the same name
      - name: dpo
        model_name_or_path: "{stages.sft}"     # the output_dir of stage sft
      - name: grpo
        model_name_or_path: "{prev}"           # the output_dir of the stage just before

A stage's options are: its config file < `defaults` < the stage's keys. References may appear in any string
option (e.g. `reward_funcs: ["{stages.reward}"]` scores with a trained reward model). Only earlier stages can be
referenced. Not here: running (`run.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from posttrain.errors import UserError, did_you_mean
from posttrain.hardware import DECODING_DTYPES, DECODING_DTYPES_TEXT
from posttrain.yaml_files import read_mapping

STAGE_KEYS = {"name", "command", "config", "evaluate"}  # everything else in a stage is a training option
TOP_KEYS = {"output_dir", "evaluation", "defaults", "stages"}
EVALUATION_DEFAULTS = {"dataset_name": "posttrain/arith-prompts", "dataset_config": None, "split": "test",
                       "num_prompts": 200, "max_new_tokens": 32, "batch_size": 64, "base": True,
                       "samples_per_prompt": 0, "sampling_temperature": 1.0,  # samples_per_prompt > 0: also sampled
                       "sampled_prompts": None,  # the sampled answers on the first N questions only (None: all)
                       # drift_dataset (e.g. posttrain/chat-prompts): also KL(start ‖ stage) on prompts outside the task
                       "drift_dataset": None, "drift_split": "test", "drift_prompts": 200, "drift_max_new_tokens": 64,
                       "dtype": "float32"}  # bfloat16: a bf16 copy decodes (native only); auto: bf16 where native
_REFERENCE = re.compile(r"\{([^{}]+)\}")
REWARD_COMMANDS = {"reward"}  # stages whose output scores text rather than generating it
DATA_COMMANDS = {"pairs"}  # stages whose output is a data set (posttrain pairs: on-policy preference pairs)


class PipelineError(UserError):
    """A mistake in a pipeline YAML file."""


@dataclasses.dataclass
class Stage:
    name: str
    command: str
    options: dict[str, Any]   # resolved: references substituted, output_dir set
    evaluate: bool            # held-out answer accuracy after the stage
    config_path: str | None

    @property
    def output_dir(self) -> str:
        return self.options["output_dir"]

    @property
    def writes_data(self) -> bool:
        """The stage's output is a data set (pairs), not a model."""
        return self.command in DATA_COMMANDS

    @property
    def is_policy(self) -> bool:
        """The stage's output generates text (not a reward model, not a data set)."""
        return self.command not in REWARD_COMMANDS and not self.writes_data


@dataclasses.dataclass
class Pipeline:
    path: str
    output_dir: str
    evaluation: dict[str, Any]
    stages: list[Stage]


def _read(path: str) -> dict[str, Any]:
    return read_mapping(path, "pipeline file", "a mapping with a 'stages' list", PipelineError)


def load(path: str, output_dir: str | None = None) -> Pipeline:
    """Read and check a pipeline file; every stage's options resolved (config file, defaults, references)."""
    from posttrain.cli import COMMANDS

    data = _read(path)
    for key in data:
        if key not in TOP_KEYS:
            raise PipelineError(f"unknown key '{key}' in {path}{did_you_mean(key, TOP_KEYS)} (keys: "
                                f"{', '.join(sorted(TOP_KEYS))})")
    stages_in = data.get("stages")
    if not isinstance(stages_in, list) or not stages_in:
        raise PipelineError(f"{path} needs 'stages': a list of stages, each a mapping with a 'name'")
    root = output_dir or data.get("output_dir") or os.path.splitext(os.path.basename(path))[0]
    evaluation = dict(EVALUATION_DEFAULTS)
    for key, value in (data.get("evaluation") or {}).items():
        if key not in EVALUATION_DEFAULTS:
            raise PipelineError(f"unknown evaluation key '{key}' in {path}{did_you_mean(key, EVALUATION_DEFAULTS)}")
        evaluation[key] = value
    if evaluation["dtype"] not in DECODING_DTYPES:
        raise PipelineError(f"evaluation dtype {evaluation['dtype']!r} in {path}: use {DECODING_DTYPES_TEXT} "
                            f"(bfloat16 where the hardware runs it natively)")
    subset = evaluation["sampled_prompts"]
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise PipelineError(f"evaluation sampled_prompts {subset!r} in {path}: give a number of questions >= 1 (the "
                            f"first N are also answered by sampling), or leave it out for all of them")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PipelineError(f"'defaults' in {path} must be a mapping of option: value")
    base_dir = os.path.dirname(os.path.abspath(path))
    outputs: dict[str, str] = {}  # stage name → output_dir, for references
    commands: dict[str, str] = {}
    stages = []
    for i, raw in enumerate(stages_in):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise PipelineError(f"stage {i + 1} in {path} must be a mapping with a 'name' (e.g. name: sft)")
        name = str(raw["name"])
        if name in outputs:
            raise PipelineError(f"stage name '{name}' appears twice in {path}; give each stage its own name")
        command = str(raw.get("command", name))
        if command not in COMMANDS and command not in DATA_COMMANDS:
            known = [*COMMANDS, *DATA_COMMANDS]
            raise PipelineError(f"stage '{name}': unknown command '{command}'{did_you_mean(command, known)} "
                                f"(set command: to one of {', '.join(known)})")
        config_path = None
        options: dict[str, Any] = {}
        if raw.get("config"):
            config_path = str(raw["config"])
            if not os.path.isabs(config_path) and not os.path.isfile(config_path):
                config_path = os.path.join(base_dir, config_path)  # relative to the pipeline file
            if not os.path.isfile(config_path):
                raise PipelineError(f"stage '{name}': config file {raw['config']!r} not found (paths are relative "
                                    f"to {path} or the current directory)")
            options = read_mapping(config_path, "config file", "a mapping of option: value", PipelineError)
        if command in DATA_COMMANDS:  # `defaults` are training options: a data stage takes those it has
            from posttrain.pairs import option_defaults

            known = option_defaults()
            options.update({k: v for k, v in defaults.items() if k in known})
        else:
            options.update(defaults)
        options.update({k: v for k, v in raw.items() if k not in STAGE_KEYS})
        context = {"output_dir": root, "prev": outputs[stages[-1].name] if stages else None,
                   **{f"stages.{n}": d for n, d in outputs.items()}}
        options = {k: _substitute(v, context, name) for k, v in options.items()}
        if "output_dir" not in raw:
            options["output_dir"] = os.path.join(root, name)
        _check_model_source(name, command, options.get("model_name_or_path"), outputs, commands)
        stage = Stage(name, command, options, False, config_path)
        stage.evaluate = bool(raw.get("evaluate", stage.is_policy))
        if stage.evaluate and stage.writes_data:
            raise PipelineError(f"stage '{name}' ({command}) writes a data set, not a model: it cannot be evaluated "
                                "(remove evaluate: true)")
        stages.append(stage)
        outputs[name], commands[name] = stage.output_dir, command
    return Pipeline(path, root, evaluation, stages)


def _substitute(value: Any, context: dict[str, str | None], stage: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, context, stage) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, context, stage) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        key = match.group(1).strip()
        if key not in context:
            known = [k for k in context if context[k] is not None]
            raise PipelineError(f"stage '{stage}': unknown reference {{{key}}}{did_you_mean(key, known)} (references: "
                                f"{{prev}}, {{output_dir}}, or {{stages.NAME}} for an earlier stage)")
        if context[key] is None:
            raise PipelineError(f"stage '{stage}' uses {{prev}} but is the first stage; give model_name_or_path "
                                "a model name or path")
        return str(context[key])

    return _REFERENCE.sub(replace, value)


def _check_model_source(stage: str, command: str, model: Any, outputs: dict[str, str],
                        commands: dict[str, str]) -> None:
    if not model:
        raise PipelineError(f"stage '{stage}' has no model_name_or_path (set it in the stage, its config file, or "
                            "use {prev} / {stages.NAME})")
    for name, directory in outputs.items():
        if model == directory and commands[name] in DATA_COMMANDS:
            raise PipelineError(f"stage '{stage}' would start from '{name}', a data set of pairs, not a model; "
                                f"start from the model that answered, and read the pairs with dataset_name: "
                                f"\"{{stages.{name}}}\"")
        if model == directory and commands[name] in REWARD_COMMANDS and command not in REWARD_COMMANDS:
            raise PipelineError(f"stage '{stage}' would start from '{name}', a reward model (it scores text, it "
                                "does not generate); start from a policy stage, e.g. {stages.sft}")
