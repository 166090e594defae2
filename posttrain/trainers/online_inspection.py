"""What code written against TRL's online trainers reads on a trainer, as a mixin of `OnlineTrainer`: the reward
functions, their weights and tokenizers (`reward_funcs`, `reward_weights`, `reward_processing_classes`,
`reward_func_names`), the rollouts' `generation_config` and the last rollout as TRL's `_logs`.

Not here: anything that changes what is trained (`trainers/online.py` and the methods).
"""

from __future__ import annotations

from typing import Any

import torch


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

