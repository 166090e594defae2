"""`RLOOConfig`: REINFORCE Leave-One-Out, named as TRL names it. Generation and reward options are GRPOConfig's."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.compat import accept_legacy_arguments
from posttrain.configs.base import check
from posttrain.configs.grpo import GRPOConfig


@accept_legacy_arguments
@dataclass
class RLOOConfig(GRPOConfig):
    """Configuration of `RLOOTrainer`. The KL to the reference is folded into the reward (k1, summed over the
    completion) with weight `beta`; the loss is a sequence-level clipped objective."""

    num_generations: int = field(default=2, metadata={"help": "Completions per prompt (k in RLOO, ≥ 2)."})
    beta: float = field(default=0.05, metadata={"help": "Weight of the KL penalty inside the reward."})
    normalize_advantages: bool = field(default=False, metadata={"help": "Whiten advantages over the batch."})
    reward_clip_range: list[float] | None = field(default=None, metadata={"help": "Clamp rewards to [low, high]."})

    def validate(self) -> None:
        super().validate()
        check(self.reward_clip_range is None or len(self.reward_clip_range) == 2,
              f"reward_clip_range needs two numbers [low, high], got {self.reward_clip_range}.")
