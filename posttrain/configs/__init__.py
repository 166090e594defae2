"""Config dataclasses, one per subcommand over a shared base. Importable without loading models or data."""

from posttrain.configs.base import PostTrainConfig
from posttrain.configs.script import ModelConfig, ScriptArguments
from posttrain.configs.sft import SFTConfig

__all__ = ["PostTrainConfig", "ModelConfig", "ScriptArguments", "SFTConfig"]
