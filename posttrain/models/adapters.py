"""LoRA/QLoRA adapters (PEFT): wrapping a policy, loading a saved adapter directory, the frozen reference adapter,
and merging adapters into full weights.

Reference with adapters: when posttrain adds fresh adapters to a plain model, the reference is that model with
adapters disabled (no second copy in memory; `models/reference.py`). When the model given already carries an
adapter (a `PeftModel`, or a saved adapter directory), the reference is that adapter as given: a frozen copy is
added under the name REFERENCE_ADAPTER and switched in for reference log-probs (adapter-sized, not model-sized).

Not here: reference log-prob computation (trainers), quantisation settings (`models/loading.py`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from posttrain.errors import UserError

REFERENCE_ADAPTER = "ref"

logger = logging.getLogger(__name__)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")) \
        and not os.path.isfile(os.path.join(path, "config.json"))


def load_adapter_model(path: str, auto_class=None, trainable: bool = True, **init_kwargs: Any):
    """A saved adapter directory → its base model (`base_model_name_or_path` of adapter_config.json, loaded like
    any model) wrapped as a `PeftModel` with the adapter loaded (trainable unless `trainable=False`)."""
    from peft import PeftModel

    from posttrain.models.loading import load_pretrained_model

    with open(os.path.join(path, "adapter_config.json")) as f:
        base_name = json.load(f).get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{path}/adapter_config.json names no base_model_name_or_path; load the base model and "
                        "pass PeftModel.from_pretrained(base, path) instead.")
    base = load_pretrained_model(base_name, auto_class, **init_kwargs)
    return PeftModel.from_pretrained(base, path, is_trainable=trainable)


def wrap(model: torch.nn.Module, peft_config, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Add fresh adapters to a plain model (k-bit models are prepared for training first: QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_peft_model(model):
        raise UserError("The model already carries adapters and peft_config= asks for new ones; drop peft_config= "
                        "to train the existing adapter, or merge it first (posttrain merge --adapter DIR ...).")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config)


def add_reference_adapter(model) -> None:
    """Freeze a copy of the active adapter of `model` (a PeftModel) as REFERENCE_ADAPTER; the active one trains."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if REFERENCE_ADAPTER in model.peft_config:
        return
    active = model.active_adapter
    if getattr(model.peft_config[active], "target_parameters", None):
        # PEFT holds one adapter per model when LoRA targets parameters (MoE experts; peft#3340): no copy can be
        # made, so the reference is the base model with the adapter disabled, as in TRL (trl#5222)
        logger.warning("The adapter targets parameters (target_parameters), and PEFT holds only one such adapter: "
                       "the reference is the base model with the adapter disabled, not the adapter as given.")
        return
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[active])
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=active),
                              adapter_name=REFERENCE_ADAPTER)
    model.set_adapter(active)
    freeze_reference_adapter(model)


def freeze_reference_adapter(model) -> None:
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)


def has_reference_adapter(model) -> bool:
    return is_peft_model(model) and REFERENCE_ADAPTER in model.peft_config


def merged_copy(model) -> torch.nn.Module:
    """A plain model with the active adapter merged into the base weights (the trained model is left as it is)."""
    import copy

    merged = copy.deepcopy(model)
    for name in [n for n in merged.peft_config if n != merged.active_adapter]:
        merged.delete_adapter(name)
    return merged.merge_and_unload()


def save_merged(model, processing_class, output_dir: str) -> str:
    """Write `model` (a PeftModel) merged into full weights, with its tokenizer, to output_dir."""
    merged = merged_copy(model)
    merged.save_pretrained(output_dir)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    return output_dir
