"""What code written against TRL's online trainers reads on a trainer, as a mixin of `OnlineTrainer`: the reward
functions, their weights and tokenizers (`reward_funcs`, `reward_weights`, `reward_processing_classes`,
`reward_func_names`), the rollouts' `generation_config`, the last rollout as TRL's `_logs`, and whether a
Mixture-of-Experts router loss is added (`moe_aux_loss_enabled` → `aux_loss_enabled`).

Not here: anything that changes what is trained (`trainers/online.py` and the methods).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from posttrain.errors import UserError


class TRLInspection:
    """Read-only views over an `OnlineTrainer`'s own state, under TRL's names."""

    @property
    def reward_funcs(self) -> list:
        """The reward functions and reward models (as TRL's trainers hold them; resolved names included)."""
        return [] if self.reward_runner is None else self.reward_runner.entries

    @property
    def reward_processing_classes(self) -> list:
        """Aligned with reward_funcs: each reward model's tokenizer, None for plain functions."""
        return [] if self.reward_runner is None else self.reward_runner.tokenizers

    @property
    def reward_weights(self) -> torch.Tensor | None:
        """(K,) float32 weights of the reward functions, as TRL's trainers hold them."""
        return None if self.reward_runner is None else torch.tensor(self.reward_runner.weights, dtype=torch.float32)

    @property
    def reward_func_names(self) -> list[str]:
        return [] if self.reward_runner is None else self.reward_runner.names

    @property
    def generation_config(self):
        """The transformers `GenerationConfig` of the rollouts (the sampling options, generation_kwargs applied,
        max_new_tokens = max_completion_length), as TRL's trainers expose it."""
        from transformers import GenerationConfig

        return GenerationConfig(**self.generation_kwargs(), max_new_tokens=self.args.max_completion_length)

    @property
    def _logs(self) -> dict[str, Any]:
        """The last rollout as TRL's trainers keep it in `_logs` (prompt, completion, rewards per function,
        advantages, the reward functions' `log_extra` columns, images), for code that reads it."""
        return getattr(self, "_last_rollout_log", None) or {"prompt": [], "completion": [], "rewards": {},
                                                            "advantages": [], "extra": {}, "images": []}


def moe_aux_loss_enabled(model: torch.nn.Module, args) -> bool:
    """TRL's rule: a model whose config has `output_router_logits` (Mixture-of-Experts) gets the router load-balancing
    loss with router_aux_loss_coef (None: the model config's own coefficient). The online trainers' log-prob pass
    runs the decoder without the router loss: an explicit coefficient is refused in one line, the model config's
    default is warned about (training without it, as before), and `aux_loss_enabled` is False."""
    coef = getattr(args, "router_aux_loss_coef", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    moe = hasattr(config, "output_router_logits")
    if coef and not moe:
        raise UserError(f"router_aux_loss_coef={coef} but {type(model).__name__} is not a Mixture-of-Experts model "
                        "with a router: there is no auxiliary loss to weigh; remove it.")
    if not moe:
        return False
    if coef:
        raise UserError(f"router_aux_loss_coef={coef}: the online trainers do not add the Mixture-of-Experts router "
                        "load-balancing loss yet (their log-prob pass runs without it); remove it, or set 0.")
    if coef is None and getattr(config, "router_aux_loss_coef", 0.0):
        warnings.warn(f"{type(model).__name__} is a Mixture-of-Experts model: TRL adds its router load-balancing "
                      f"loss (coefficient {config.router_aux_loss_coef} from the model config); posttrain's online "
                      "trainers train without it. Set router_aux_loss_coef=0 to acknowledge.", UserWarning,
                      stacklevel=4)
    return False
