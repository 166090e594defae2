"""TRL's older PPO call forms, translated at the door into the modern ones (one FutureWarning each).

- `PPOConfig(model_name=…, batch_size=…, mini_batch_size=…, ppo_epochs=…, response_length=…, adap_kl_ctrl=…,
  init_kl_coef=…, target=…, horizon=…)` → the current option names (`translate_ppo_config_options`);
- `PPOTrainer(config=…, dataset=…, data_collator=…)` → `args=`, `train_dataset=` (`translate_ppo_trainer_arguments`);
- prompts given as a `query` column or as tokenised `input_ids` (`prompts_from_older_columns`).

Not here: the loop API (`dataloader`, `generate`, `step`, `log_stats`): `compat/ppo_loop.py`.
"""

from __future__ import annotations

from typing import Any

from posttrain.compat import deprecated
from posttrain.errors import UserError

_CONFIG_RENAMES = (("adap_kl_ctrl", "adaptive_kl"), ("init_kl_coef", "kl_coef"), ("target", "kl_target"),
                   ("horizon", "kl_horizon"), ("ppo_epochs", "num_ppo_epochs"),
                   ("response_length", "max_completion_length"))
OLDER_CONFIG_OPTIONS = ("model_name", "batch_size", "mini_batch_size") + tuple(old for old, _ in _CONFIG_RENAMES)


def _warn(old: str, new: str) -> None:
    deprecated(f"PPOConfig({old}=...) is deprecated; use {new}.", stacklevel=5)


def translate_ppo_config_options(kwargs: dict[str, Any]) -> None:
    """Rewrite the older PPOConfig keyword arguments in `kwargs` (in place) into the current ones."""
    for old, new in _CONFIG_RENAMES:
        if kwargs.get(old) is not None:
            _warn(old, new)
            kwargs[new] = kwargs.pop(old)
        kwargs.pop(old, None)
    model_name = kwargs.pop("model_name", None)
    if model_name is not None:
        _warn("model_name", "PPOTrainer(model=...) (or sft_model_path=...)")
        kwargs["sft_model_path"] = kwargs.get("sft_model_path") or model_name
    mini_batch_size = kwargs.pop("mini_batch_size", None)
    if mini_batch_size is not None:
        _warn("mini_batch_size", "per_device_train_batch_size (× gradient_accumulation_steps per optimizer step)")
        kwargs["per_device_train_batch_size"] = mini_batch_size
    batch_size = kwargs.pop("batch_size", None)
    if batch_size is not None:
        _warn("batch_size", "num_mini_batches (a rollout is per_device_train_batch_size × "
                            "gradient_accumulation_steps × num_mini_batches completions)")
        step = kwargs.get("per_device_train_batch_size", 8) * kwargs.get("gradient_accumulation_steps", 1)
        if batch_size % step:
            raise UserError(f"batch_size ({batch_size}) must be a multiple of mini_batch_size × "
                            f"gradient_accumulation_steps ({step}).")
        kwargs["num_mini_batches"] = batch_size // step


def translate_ppo_trainer_arguments(name: str, args, train_dataset, kwargs: dict[str, Any]):
    """Older PPOTrainer keywords: config= → args=, dataset= → train_dataset=, data_collator= (not used)."""
    given = {"args": args, "train_dataset": train_dataset}
    for old, new in (("config", "args"), ("dataset", "train_dataset")):
        if old in kwargs:
            deprecated(f"{name}({old}=...) is deprecated; use {name}({new}=...).")
            value = kwargs.pop(old)
            given[new] = given[new] if given[new] is not None else value  # the modern keyword wins
    if kwargs.pop("data_collator", None) is not None:
        deprecated(f"{name} builds its batches from the prompts it samples; data_collator is ignored.")
    return given["args"], given["train_dataset"]


def prompts_from_older_columns(dataset, tokenizer):
    """TRL's PPO data forms: a `query` text column, or prompts already tokenised as `input_ids` (decoded here, then
    tokenised again with the rest of the rollout machinery). Other datasets are returned unchanged."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if "prompt" in columns or not columns:
        return dataset
    if "query" in columns:
        return dataset.rename_column("query", "prompt")
    if "input_ids" in columns:
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        return dataset.map(lambda row: {"prompt": _decode_prompt(tok, row["input_ids"])})
    return dataset


def _decode_prompt(tokenizer, input_ids: list[int]) -> str:
    text = tokenizer.decode(input_ids, skip_special_tokens=False)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text  # tokenising again adds BOS again
