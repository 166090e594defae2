"""`Rollout`: what one generation batch produced, with documented shapes.

N = number of completions (unique prompts × num_generations, grouped consecutively), P = padded prompt length
(prompts are LEFT-padded so every completion starts at column P), C = padded completion length (right-padded).
The online base makes one per generation batch, and each method's one hook turns it into micro-batches
(`trainers/online.py`).
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
    loss_mask: torch.Tensor | None = None  # (N, C) 1 on the tokens trained on (default completion_mask; 0 on a
    #                                        truncated completion under mask_truncated_completions, and on tool
    #                                        results inside a multi-turn completion)
    prompts: list[Any] = field(default_factory=list)  # raw prompts (strings or message lists), one per completion
    completions: list[Any] = field(default_factory=list)  # decoded completions (strings or message lists)
    columns: dict[str, list] = field(default_factory=dict)  # the prompts' other dataset columns, one entry per row
    rewards: torch.Tensor | None = None  # (N, K) one column per reward function, NaN = not applicable
    scores: torch.Tensor | None = None  # (N,) weighted sum of the rewards (NaN where no function applied)
    group_rewards: torch.Tensor | None = None  # (N_all, K) rewards of the whole generation batch, every process
    #                                            (rows in global order; = rewards with one process)
    old_logps: torch.Tensor | None = None  # (N, C) sampling-policy log-probs (when the method needs them)
    ref_logps: torch.Tensor | None = None  # (N, C) reference log-probs (when the method holds a reference)
    sampler_logps: torch.Tensor | None = None  # (N, C) log-probs the generation engine sampled each token with
    #                                            (vLLM; NaN where it gave none); None from transformers' generate
    advantages: torch.Tensor | None = None  # (N,) per completion, set by the method's hook (completions table)
    # multi-turn rollouts (`rollout/agentic.py`): completion_mask covers model turns and tool results alike (context),
    # loss_mask the model's own tokens only; completions are message lists with the tool turns
    tool_calls: torch.Tensor | None = None  # (N,) tool calls made by each rollout
    tool_failures: torch.Tensor | None = None  # (N,) of them, those answered with an error
    turns: torch.Tensor | None = None  # (N,) model turns
    logged_columns: dict[str, list] = field(default_factory=dict)  # columns reward functions gave `log_extra`
    image_index: torch.Tensor | None = None  # (N,) each row's index into the images of an image rollout
    #                                          (trainers/vision.py); None for text
    reward_kwargs: dict[str, list] = field(default_factory=dict)  # extra per-row keywords for the reward functions
    #                                                               (environments, a rollout_func's extra fields)

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask

    @property
    def input_ids(self) -> torch.Tensor:  # (N, P + C)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (N, P + C)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)
