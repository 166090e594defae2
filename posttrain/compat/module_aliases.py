"""TRL's module paths under posttrain: `from posttrain.trainer.sft_trainer import SFTTrainer`,
`from posttrain.experimental.orpo import ORPOTrainer`, `from posttrain.rewards.accuracy_rewards import …`.

One mechanism: `ALIASES` maps each path TRL 1.16 users import (with `trl` → `posttrain`) to the posttrain modules
that hold its names. A meta-path finder, installed when `posttrain` is imported, answers imports of those paths with
a lazy module: an attribute is looked up in the source modules, in order, on first access (nothing heavy loads
before). Source modules that do not exist in this install are skipped; a path none of whose sources exist is not
importable (ModuleNotFoundError naming what is missing), so an alias for a trainer another branch adds (GKD,
distillation) resolves exactly when that trainer is there.

Not here: older call forms of the trainers and configs (`compat/__init__.py`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_SFT = ("posttrain.trainers.sft", "posttrain.configs.sft", "posttrain.data.collators")
_DPO = ("posttrain.trainers.dpo", "posttrain.configs.dpo", "posttrain.data.collators")
_KTO = ("posttrain.trainers.kto", "posttrain.configs.kto", "posttrain.data.collators")
_CPO = ("posttrain.trainers.cpo", "posttrain.configs.cpo")
_ONLINE_DPO = ("posttrain.trainers.online_dpo", "posttrain.configs.online_dpo")
_GKD = ("posttrain.trainers.distillation", "posttrain.configs.distillation")
_DISTILLATION = ("posttrain.trainers.distillation", "posttrain.configs.distillation")
_REWARDS = ("posttrain.rewards",)

ALIASES: dict[str, tuple[str, ...]] = {
    # trl.trainer.*: the stable trainers, configs and helpers
    "posttrain.trainer": ("posttrain",),
    "posttrain.trainer.sft_trainer": _SFT,
    "posttrain.trainer.sft_config": ("posttrain.configs.sft",),
    "posttrain.trainer.dpo_trainer": _DPO,
    "posttrain.trainer.dpo_config": ("posttrain.configs.dpo",),
    "posttrain.trainer.kto_trainer": _KTO,
    "posttrain.trainer.kto_config": ("posttrain.configs.kto",),
    "posttrain.trainer.reward_trainer": ("posttrain.trainers.reward", "posttrain.configs.reward"),
    "posttrain.trainer.reward_config": ("posttrain.configs.reward",),
    "posttrain.trainer.grpo_trainer": ("posttrain.trainers.grpo", "posttrain.configs.grpo"),
    "posttrain.trainer.grpo_config": ("posttrain.configs.grpo",),
    "posttrain.trainer.rloo_trainer": ("posttrain.trainers.rloo", "posttrain.configs.rloo"),
    "posttrain.trainer.rloo_config": ("posttrain.configs.rloo",),
    "posttrain.trainer.distillation_trainer": _DISTILLATION,
    "posttrain.trainer.distillation_config": ("posttrain.configs.distillation",),
    "posttrain.trainer.model_config": ("posttrain.configs.script",),
    "posttrain.trainer.callbacks": ("posttrain.callbacks",),
    "posttrain.trainer.utils": ("posttrain.scripts",),
    "posttrain.trainer.base_config": ("posttrain.configs.base",),
    "posttrain.trainer.base_trainer": ("posttrain.trainers.base",),
    # trl.experimental.*: methods TRL keeps outside its stable API (KTO and distillation: deprecated paths there)
    "posttrain.experimental": ("posttrain",),
    "posttrain.experimental.orpo": _CPO,
    "posttrain.experimental.orpo.orpo_trainer": _CPO,
    "posttrain.experimental.orpo.orpo_config": ("posttrain.configs.cpo",),
    "posttrain.experimental.cpo": _CPO,
    "posttrain.experimental.cpo.cpo_trainer": _CPO,
    "posttrain.experimental.cpo.cpo_config": ("posttrain.configs.cpo",),
    "posttrain.experimental.kto": _KTO,
    "posttrain.experimental.online_dpo": _ONLINE_DPO,
    "posttrain.experimental.online_dpo.online_dpo_trainer": _ONLINE_DPO,
    "posttrain.experimental.online_dpo.online_dpo_config": ("posttrain.configs.online_dpo",),
    "posttrain.experimental.gkd": _GKD,
    "posttrain.experimental.gkd.gkd_trainer": _GKD,
    "posttrain.experimental.gkd.gkd_config": ("posttrain.configs.distillation",),
    "posttrain.experimental.distillation": _DISTILLATION,
    "posttrain.experimental.merge_model_callback": ("posttrain.callbacks",),
    "posttrain.experimental.utils": ("posttrain.data_utils", "posttrain.models.reference"),
    # helpers
    "posttrain.rewards.accuracy_rewards": _REWARDS,
    "posttrain.rewards.format_rewards": _REWARDS,
    "posttrain.rewards.other_rewards": _REWARDS,
    "posttrain.scripts.utils": ("posttrain.scripts", "posttrain.configs.script"),
    "posttrain.chat_template_utils": ("posttrain.data.templates", "posttrain.data.template_support"),
    "posttrain.models.utils": ("posttrain.models.reference",),
}


def _exists(module: str) -> bool:
    if module in sys.modules or module in ALIASES:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class AliasModule(types.ModuleType):
    """A module whose attributes come from `__alias_sources__`, looked up on first access and then cached."""

    def __getattr__(self, name: str):
        sources = self.__dict__.get("__alias_sources__", ())
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        for source in sources:
            module = importlib.import_module(source)
            if name != "__all__" and hasattr(module, name):
                value = getattr(module, name)
                setattr(self, name, value)
                return value
        if name == "__all__":
            names = sorted({n for s in sources for n in (getattr(importlib.import_module(s), "__all__", None)
                                                          or dir(importlib.import_module(s))) if not n.startswith("_")})
            self.__all__ = names
            return names
        raise AttributeError(f"module {self.__name__!r} (posttrain's path for TRL's "
                             f"{self.__name__.replace('posttrain', 'trl', 1)}) has no attribute {name!r}; it looks in "
                             f"{', '.join(sources)}.")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.__all__))


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        module = AliasModule(spec.name)
        module.__alias_sources__ = tuple(s for s in ALIASES[spec.name] if _exists(s))
        return module

    def exec_module(self, module) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        sources = ALIASES.get(fullname)
        if sources is None:
            return None
        if not any(_exists(s) for s in sources):
            raise ModuleNotFoundError(f"No module named {fullname!r}: posttrain has no counterpart of TRL's "
                                      f"{fullname.replace('posttrain', 'trl', 1)} in this install (it would come "
                                      f"from {', '.join(sources)}).", name=fullname)
        spec = importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        spec.submodule_search_locations = []
        return spec


def install() -> None:
    """Put the alias finder on sys.meta_path (once)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
