"""`GRPOConfig`: options of Group Relative Policy Optimization and its loss variants, named as TRL names them.

Not here: the losses (`losses/policy.py`), advantages (`algorithms/advantages.py`), rollouts (`rollout/`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain.algorithms.advantages import SCALE_REWARDS
from posttrain.configs.base import check, check_bounds, posttrain_config
from posttrain.configs.online import ScoredGroupConfig
from posttrain.losses.policy import POLICY_LOSSES, SAMPLER_IS_MODES

GRPO_LOSS_TYPES = tuple(POLICY_LOSSES)  # grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo
LOSS_NORMALIZATIONS = ("global", "trl")


@posttrain_config
@dataclass
class GRPOConfig(ScoredGroupConfig):
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
    vespo_k_pos: float = field(default=2.0, metadata={"help": "vespo: power k of the weight w^k·e^(−λw) for A ≥ 0 "
                               "(how fast sequences with w < 1 are down-weighted)."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "vespo: decay λ for A ≥ 0 (how fast w > 1 is "
                                    "down-weighted)."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "vespo: power k for A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "vespo: decay λ for A < 0."})
    off_policy_mask_threshold: float | None = field(default=None, metadata={"help": "DeepSeek-V3.2 off-policy "
                                                    "sequence masking: drop completions with A < 0 whose mean "
                                                    "per-token log π_sampler − log πθ exceeds this (e.g. 0.5). None: "
                                                    "off."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus: loss − coef × mean "
                                "per-token entropy of the trained tokens (the starting value under "
                                "use_adaptive_entropy)."})
    use_adaptive_entropy: bool = field(default=False, metadata={"help": "Skywork-OR1 adaptive entropy: after each "
                                       "optimizer step raise entropy_coef by entropy_coef_delta when the step's "
                                       "entropy ≤ entropy_target, else lower it; the bonus applies only while "
                                       "entropy ≤ entropy_target."})
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Lower bound of the adaptive entropy_coef."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Upper bound of the adaptive entropy_coef."})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "Step of the adaptive entropy_coef."})
    entropy_target: float = field(default=0.2, metadata={"help": "Target mean entropy (nats) of adaptive entropy."})
    cast_lm_head_to_fp32: bool = field(default=False, metadata={"help": "Keep the LM head of the policy and the "
                                       "reference in float32 (ScaleRL); needs untied embeddings."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "use_vllm: correct for the "
                                                      "difference between vLLM's sampling log-probs and the "
                                                      "trainer's (importance weight π_old/π_vLLM, truncated or "
                                                      "masked per vllm_importance_sampling_mode)."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={
        "help": "token_truncate / sequence_truncate: clamp the token / sequence weight to [clip_min, clip_max]; "
                "token_mask / sequence_mask: weight 0 outside it.", "choices": list(SAMPLER_IS_MODES)})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "Upper bound C_max of "
                                                            "the vLLM importance weight (None: none)."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "Lower bound C_min of "
                                                            "the vLLM importance weight (None: none)."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "Deprecated TRL name of "
                                                       "vllm_importance_sampling_clip_max."})
    log_completions_hub_repo: str | None = field(default=None, metadata={"help": "TRL: push the completions table "
                                                 "to this Hub dataset. Not offered (the table is "
                                                 "output_dir/completions.jsonl, pushed with the model by "
                                                 "push_to_hub); refused when set."})

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn("vllm_importance_sampling_cap is deprecated: use vllm_importance_sampling_clip_max.",
                          FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
            self.vllm_importance_sampling_cap = None
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs siblings to compare), "
                                         f"got {self.num_generations}.")
        check(self.loss_type in GRPO_LOSS_TYPES,
              f"Unknown loss_type {self.loss_type!r} for GRPO; choose one of: {', '.join(GRPO_LOSS_TYPES)}.")
        check(self.scale_rewards in SCALE_REWARDS,
              f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}.")
        check_bounds(self, "epsilon > 0", "epsilon_high > 0", "beta >= 0", "entropy_coef_delta >= 0")
        check(0 < self.top_entropy_quantile <= 1, f"top_entropy_quantile must be in (0, 1], got "
                                                  f"{self.top_entropy_quantile}.")
        check(self.max_tokens_per_backward is None or (self.top_entropy_quantile == 1 and self.entropy_coef == 0
                                                       and not self.use_adaptive_entropy),
              "max_tokens_per_backward cannot be combined with top_entropy_quantile < 1 or an entropy bonus: both "
              "are computed over the whole micro-batch (a token threshold, a mean), which slicing it would change. "
              "Remove one of them.")
        check(self.log_completions_hub_repo is None or self.log_completions,
              "log_completions_hub_repo is set but log_completions is False; enable log_completions or remove it.")
        check(self.log_completions_hub_repo is None, "log_completions_hub_repo is not offered by posttrain: the "
                                                     "completions table is saved to output_dir/completions.jsonl "
                                                     "(push_to_hub uploads it with the model); remove it.")
        check(self.vllm_importance_sampling_mode in SAMPLER_IS_MODES,
              f"vllm_importance_sampling_mode must be one of {', '.join(SAMPLER_IS_MODES)}, got "
              f"{self.vllm_importance_sampling_mode!r}.")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        check(low is None or high is None or low < high, f"vllm_importance_sampling_clip_min ({low}) must be less "
                                                         f"than vllm_importance_sampling_clip_max ({high}).")
        check(not (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("truncate")
                   and low is None and high is None),
              "A *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min or _clip_max.")
        check(not (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                   and not self.vllm_importance_sampling_mode.startswith("token")),
              f"loss_type='vespo' folds the vLLM correction into its sequence weight token by token: set "
              f"vllm_importance_sampling_mode to token_truncate or token_mask (got "
              f"{self.vllm_importance_sampling_mode!r}).")
        check(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold >= 0,
              f"off_policy_mask_threshold must be >= 0, got {self.off_policy_mask_threshold}.")
        check(self.entropy_coef_min <= self.entropy_coef_max, f"entropy_coef_min ({self.entropy_coef_min}) must be "
                                                              f"<= entropy_coef_max ({self.entropy_coef_max}).")
        check(self.loss_normalization in LOSS_NORMALIZATIONS, f"loss_normalization must be one of "
                                                              f"{', '.join(LOSS_NORMALIZATIONS)}, got "
                                                              f"{self.loss_normalization!r}.")

