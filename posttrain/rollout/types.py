"""`Rollout`: what one generation batch produced, with documented shapes.

N = number of completions (unique prompts × num_generations, grouped consecutively), P = padded prompt length
(prompts are LEFT-padded so every completion starts at column P), C = padded completion length (right-padded).
Not here: how completions are generated (`rollout/hf.py`) or scored (`rewards/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, C) right-padded; tokens after the first EOS are padding
    completion_mask: torch.Tensor  # (N, C) 1 on generated tokens up to and including EOS
    is_truncated: torch.Tensor  # (N,) bool: no EOS within max_completion_length
    prompts: list[Any] = field(default_factory=list)  # raw prompts (strings or message lists), one per completion
    completions: list[Any] = field(default_factory=list)  # decoded completions (strings or message lists)
    rewards: torch.Tensor | None = None  # (N, K) one column per reward function, NaN = not applicable
    advantages: torch.Tensor | None = None  # (N,) constant over a completion's tokens
    all_rewards: torch.Tensor | None = None  # (N_all, K) rewards of the whole generation batch, every process
    old_logps: torch.Tensor | None = None  # (N, C) sampling-policy log-probs (only when reused off-policy)
    ref_logps: torch.Tensor | None = None  # (N, C) reference log-probs (only when beta > 0)

    @property
    def input_ids(self) -> torch.Tensor:  # (N, P + C)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (N, P + C)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)
