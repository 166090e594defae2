"""`RLOOConfig`: REINFORCE Leave-One-Out, named as TRL names it. Generation, reward and batching options are the
shared rollout part (`configs/online.py`); GRPO's loss variants do not apply and are refused."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import check, check_bounds, posttrain_config
from posttrain.configs.online import ScoredGroupConfig


@posttrain_config
@dataclass
class RLOOConfig(ScoredGroupConfig):
    """Configuration of `RLOOTrainer`. The KL to the reference is folded into the reward (k1, summed over the
    completion) with weight `beta`; the loss is a sequence-level clipped objective."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    num_generations: int = field(default=2, metadata={"help": "Completions per prompt (k in RLOO, ≥ 2)."})
    beta: float = field(default=0.05, metadata={"help": "Weight of the KL penalty inside the reward (0 = no "
                        "reference model is loaded)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range ε of the sequence ratio."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default ε)."})
    normalize_advantages: bool = field(default=False, metadata={"help": "Whiten advantages over the batch."})
    reward_clip_range: list[float] | None = field(default=None, metadata={"help": "Clamp rewards to [low, high]."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Exclude completions that hit "
                                             "max_completion_length without EOS from the loss."})

    def __post_init__(self) -> None:
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_generations >= 2, f"num_generations must be >= 2 (the baseline is the other completions of "
                                         f"the prompt), got {self.num_generations}.")
        check_bounds(self, "epsilon > 0", "epsilon_high > 0", "beta >= 0")
        check(self.reward_clip_range is None or len(self.reward_clip_range) == 2,
              f"reward_clip_range needs two numbers [low, high], got {self.reward_clip_range}.")
