"""`GRPOConfig`: options of Group Relative Policy Optimization and its loss variants, named as TRL names them.

Not here: the losses (`losses/policy.py`), advantages (`algorithms/advantages.py`), rollouts (`rollout/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import check, posttrain_config
from posttrain.configs.online import ToolRolloutConfig

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_NORMALIZATIONS = ("global", "trl")


@posttrain_config
@dataclass
class GRPOConfig(ToolRolloutConfig):
    """Configuration of `GRPOTrainer`: the shared rollout options (`configs/online.py`: generation, vLLM, rewards,
    batching), every `transformers.TrainingArguments` field, and GRPO's advantage and loss options below."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (group size G, ≥ 2)."})
    scale_rewards: str = field(default="group", metadata={"help": "Divide advantages by the std of the group, "
                               "of the batch, or none (Dr. GRPO).", "choices": list(SCALE_REWARDS)})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "sum_then_normalize (weighted sum, then group normalisation) or normalize_then_sum (GDPO).",
        "choices": ["sum_then_normalize", "normalize_then_sum"]})
    # loss
    loss_type: str = field(default="dapo", metadata={"help": "One of: " + ", ".join(GRPO_LOSS_TYPES) + ".",
                                                     "choices": list(GRPO_LOSS_TYPES)})
    beta: float = field(default=0.0, metadata={"help": "Weight of the k3 KL to the reference (0 = no reference "
                        "model is loaded)."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the per-token KL by the "
                                         "importance ratio πθ/π_old (DeepSeek-V3.2: an unbiased reverse-KL "
                                         "gradient off-policy; changes the gradient even at ratio 1). As TRL."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range ε."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default ε; DAPO "
                                       "uses 0.28)."})
    delta: float | None = field(default=None, metadata={"help": "Two-sided clipping: cap the ratio at δ."})
    importance_sampling_level: str = field(default="token", metadata={"help": "token, or sequence (GSPO).",
                                           "choices": ["token", "sequence"]})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature for A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature for A ≤ 0."})
    loss_normalization: str = field(default="global", metadata={
        "help": "global: every loss type is normalised by its items (tokens or sequences) in everything one "
                "optimizer step trains on, all accumulation steps and processes, so the loss does not depend on how "
                "the batch is split. trl: as TRL 1.16, grpo, bnpo, dr_grpo and sapo normalise each micro-batch by "
                "its own count and average over accumulation steps (bnpo then weighs micro-batches equally "
                "whatever their token counts).", "choices": list(LOSS_NORMALIZATIONS)})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Exclude completions that hit "
                                             "max_completion_length without EOS from the loss."})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "Train only on the tokens whose entropy "
                                        "is in this top fraction (0.2 in the 80/20 paper; 1 = all)."})

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs siblings to compare), "
                                         f"got {self.num_generations}.")
        check(self.loss_type in GRPO_LOSS_TYPES,
              f"Unknown loss_type {self.loss_type!r} for GRPO; choose one of: {', '.join(GRPO_LOSS_TYPES)}.")
        check(self.scale_rewards in SCALE_REWARDS,
              f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}.")
        check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}.")
        check(self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}.")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}.")
        check(0 < self.top_entropy_quantile <= 1, f"top_entropy_quantile must be in (0, 1], got "
                                                  f"{self.top_entropy_quantile}.")
        check(self.loss_normalization in LOSS_NORMALIZATIONS, f"loss_normalization must be one of "
                                                              f"{', '.join(LOSS_NORMALIZATIONS)}, got "
                                                              f"{self.loss_normalization!r}.")

