"""posttrain: post-training for language models with TRL's names — `from posttrain import SFTTrainer, SFTConfig`.

Public API only; heavy modules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "SFTTrainer": "posttrain.trainers.sft",
    "SFTConfig": "posttrain.configs.sft",
    "DPOTrainer": "posttrain.trainers.dpo",
    "DPOConfig": "posttrain.configs.dpo",
    "RewardTrainer": "posttrain.trainers.reward",
    "RewardConfig": "posttrain.configs.reward",
    "KTOTrainer": "posttrain.trainers.kto",
    "KTOConfig": "posttrain.configs.kto",
    "CPOTrainer": "posttrain.trainers.cpo",
    "CPOConfig": "posttrain.configs.cpo",
    "ORPOTrainer": "posttrain.trainers.cpo",
    "ORPOConfig": "posttrain.configs.cpo",
    "GRPOTrainer": "posttrain.trainers.grpo",
    "GRPOConfig": "posttrain.configs.grpo",
    "RLOOTrainer": "posttrain.trainers.rloo",
    "RLOOConfig": "posttrain.configs.rloo",
    "PPOTrainer": "posttrain.trainers.ppo",
    "PPOConfig": "posttrain.configs.ppo",
    "OnlineDPOTrainer": "posttrain.trainers.online_dpo",
    "OnlineDPOConfig": "posttrain.configs.online_dpo",
    "DistillationTrainer": "posttrain.trainers.distillation",
    "DistillationConfig": "posttrain.configs.distillation",
    "GKDTrainer": "posttrain.trainers.distillation",
    "GKDConfig": "posttrain.configs.distillation",
    "ModelConfig": "posttrain.configs.script",
    "ScriptArguments": "posttrain.configs.script",
    "PostTrainConfig": "posttrain.configs.base",
    "PostTrainer": "posttrain.trainers.base",
    "DataCollatorForLanguageModeling": "posttrain.data.collators",
    "load_any_dataset": "posttrain.data.loading",
    "create_reference_model": "posttrain.models.reference",
    # TRL's data helpers (trl.data_utils, trl.chat_template_utils)
    **dict.fromkeys(["apply_chat_template", "maybe_apply_chat_template", "extract_prompt", "maybe_extract_prompt",
                     "unpair_preference_dataset", "maybe_unpair_preference_dataset", "is_conversational",
                     "is_conversational_from_value", "maybe_convert_to_chatml", "pack_dataset", "truncate_dataset",
                     "prepare_multimodal_messages", "clone_chat_template"], "posttrain.data_utils"),
    **dict.fromkeys(["add_response_schema", "get_training_chat_template", "supports_tool_calling"],
                    "posttrain.data.template_support"),
    # TRL's script helpers (trl.scripts.utils, trl.trainer.utils)
    **dict.fromkeys(["TrlParser", "get_peft_config", "get_quantization_config", "get_kbit_device_map",
                     "get_dataset"], "posttrain.scripts"),
    "DatasetMixtureConfig": "posttrain.configs.script",
    # callbacks users attach
    **dict.fromkeys(["LogCompletionsCallback", "SyncRefModelCallback", "BEMACallback", "MergeModelCallback",
                     "MergeConfig"], "posttrain.callbacks"),
}
__all__ = sorted(_LAZY)

# TRL's module paths (posttrain.trainer.sft_trainer, posttrain.experimental.orpo, …) as lazy aliases.
from posttrain.compat.module_aliases import install as _install_module_aliases  # noqa: E402

_install_module_aliases()

if TYPE_CHECKING:  # pragma: no cover
    from posttrain.configs.sft import SFTConfig
    from posttrain.trainers.sft import SFTTrainer


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    if name.endswith(("Trainer", "Config", "Arguments")):
        from posttrain.compat import install_training_arguments_aliases

        install_training_arguments_aliases()
    value = getattr(module, name)
    globals()[name] = value
    return value
