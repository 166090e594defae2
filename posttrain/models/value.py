"""Value models (critics) for PPO, and the one module that trains a policy and its critic together.

Lives here: loading a critic (a one-label `AutoModelForSequenceClassification`, as TRL's PPO uses: a backbone and a
scalar head, read at every position instead of only the last), per-position values, and `PolicyAndValue`, the
container the Hugging Face Trainer optimises, wraps (DDP, DeepSpeed, FSDP) and clips as one model.
Not here: the value loss (`losses/value.py`), GAE (`algorithms/advantages.py`), saving (the PPO trainer saves
the policy and the critic as two ordinary checkpoints).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.models import loading
from posttrain.models.logprobs import _base_model, _forward_accepts_logits_to_keep

logger = logging.getLogger(__name__)


def load_value_model(name_or_path: str, **init_kwargs: Any) -> torch.nn.Module:
    """A critic from a name or path: `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`
    (the head is newly initialised unless the checkpoint is a reward/value model)."""
    from transformers import AutoModelForSequenceClassification

    return loading.load_pretrained_model(name_or_path, AutoModelForSequenceClassification,
                                         **{"num_labels": 1, **init_kwargs})


def value_model_from_policy(policy: torch.nn.Module, init_kwargs: dict | None = None) -> torch.nn.Module:
    """The default critic: a copy of the policy's backbone (its base model under PEFT, as the weights are now, not
    as its checkpoint holds them) under a new scalar head. Where the backbone cannot be copied (e.g. quantised
    weights), the policy's checkpoint is loaded instead."""
    from transformers import AutoModelForSequenceClassification

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(base, value.base_model_prefix, None)
    try:
        if backbone is None:
            raise UserError(f"{type(base).__name__} has no {value.base_model_prefix!r} backbone")
        getattr(value, value.base_model_prefix).load_state_dict(backbone.state_dict())
    except (ValueError, RuntimeError) as e:
        path = getattr(base.config, "_name_or_path", "")
        if not path:
            raise UserError(f"Cannot build a value model from the policy ({e}); pass value_model=... or set "
                            "value_model_name_or_path.") from e
        logger.info("Loading the value model from %r (%s).", path, e)
        return load_value_model(path, **(init_kwargs or {}))
    parameter = next(base.parameters())
    return value.to(device=parameter.device, dtype=parameter.dtype)


def value_head(value_model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a sequence classifier (`score` on decoder models, `classifier` on encoders)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(value_model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise UserError(f"{type(value_model).__name__} has no scalar head (score/classifier); give a value model loaded "
                    "with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1).")


def token_values(value_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """V at every position: the head applied to each last-layer hidden state (not only the last token's).

    Args: input_ids, attention_mask, position_ids (B, T). Returns: (B, T) float32; V[:, t] is the value of the
    state after token t (so the value before completion token j, at column P + j, is V[:, P + j − 1]).
    """
    backbone = getattr(value_model, value_model.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]
    return value_head(value_model)(hidden).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The policy and its critic as one module, so the Trainer's optimizer, gradient clipping and distributed
    wrapper cover both. `forward` is the policy's (generation and log-prob code use it unchanged); with
    `with_values=True` the output also carries `state_values` (B, T) from the critic, computed in the same call so
    a distributed wrapper sees one forward per backward."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self._policy_keeps_logits = _forward_accepts_logits_to_keep(type(_base_model(policy)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                with_values: bool = False, **kwargs: Any):
        if self._policy_keeps_logits:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, **kwargs)
        else:  # the policy computes every position; keep what was asked for
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
            if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep:
                keep = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else slice(-logits_to_keep, None)
                out.logits = out.logits[:, keep]
        if with_values:
            out["state_values"] = token_values(self.value_model, input_ids, attention_mask, position_ids)
        return out

    # What the Trainer and the generation code ask of "the model" is the policy's.
    @property
    def config(self):
        return self.policy.config

    @property
    def generation_config(self):
        return self.policy.generation_config

    def generate(self, *args: Any, **kwargs: Any):
        return self.policy.generate(*args, **kwargs)

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        for module in (self.policy, self.value_model):
            module.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        for module in (self.policy, self.value_model):
            module.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:  # the older name
        for module in (self.policy, self.value_model):
            module.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for module in (self.policy, self.value_model):
            module.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        for module in (self.policy, self.value_model):
            module.enable_input_require_grads()
