"""`OnlineDPOConfig`: options of Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"), named as TRL names them. Generation, reward and batching options are the shared rollout part
(`configs/online.py`).

num_generations is 2 (one pair per prompt) and must stay 2; `loss_type` is a DPO loss (sigmoid, ipo); `beta` is
DPO's β and may be a list (one value per epoch, the last one reused after it); `temperature` defaults to 0.9 as in
TRL. GRPO's policy-gradient options (epsilon, delta, importance_sampling_level, sapo_*, scale_rewards, …) and
`mask_truncated_completions` are refused (use `missing_eos_penalty`).

Batch sizes count completions, as in every posttrain online trainer: per_device_train_batch_size=8 trains on 4
pairs per micro-step (TRL's Online DPO counts prompts, so double TRL's value to get the same batch).

Not here: the losses (`losses/preference.py`), the trainer (`trainers/online_dpo.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import check, posttrain_config
from posttrain.configs.online import GroupRolloutConfig
from posttrain.losses.preference import DPO_LOSSES

# Losses that make sense on one sampled pair per prompt, as TRL's Online DPO offers them.
ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")
assert set(ONLINE_DPO_LOSS_TYPES) <= set(DPO_LOSSES)


@posttrain_config
@dataclass
class OnlineDPOConfig(GroupRolloutConfig):
    """Configuration of `OnlineDPOTrainer` (every `transformers.TrainingArguments` field and the shared rollout
    options are accepted too)."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial AdamW learning rate."})
    num_generations: int = field(default=2, metadata={"help": "Completions per prompt: always 2 (one pair)."})
    max_completion_length: int = field(default=64, metadata={"help": "Most tokens generated per completion."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "TRL's name for max_completion_length "
                                       "(sets it when given)."})
    max_length: int = field(default=512, metadata={"help": "Most tokens (prompt + completion) of the log-prob "
                            "passes: longer rows lose their leftmost prompt tokens there, as TRL (generation still "
                            "sees the whole prompt, up to max_prompt_length)."})
    reward_model_path: str | None = field(default=None, metadata={"help": "TRL's name for a reward model scoring "
                                          "completions (Hub id or local directory); same as "
                                          "reward_model_name_or_path."})
    vllm_gpu_memory_utilization: float = field(default=0.55, metadata={"help": "Share of GPU memory the colocated "
                                               "vLLM engine may take (0.55, as TRL's Online DPO)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (the DPO log-probs are the "
                               "model's own, at temperature 1)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "DPO's β (τ for ipo): strength of the pull towards the reference. Several values = one per epoch, "
                "the last reused after."})
    loss_type: str = field(default="sigmoid", metadata={"help": "One of: " + ", ".join(ONLINE_DPO_LOSS_TYPES) + ".",
                                                        "choices": list(ONLINE_DPO_LOSS_TYPES)})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                              "completion that ends without EOS (e.g. 1.0), before the pair is "
                                              "ranked."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in policy and reference."})

    def __post_init__(self) -> None:
        if isinstance(self.beta, (list, tuple)):
            values = [float(b) for b in self.beta]
            check(len(values) > 0, "beta is an empty list; give one value (e.g. 0.1) or one per epoch.")
            self.beta = values[0] if len(values) == 1 else values
        if self.reward_model_path is not None:
            check(self.reward_model_name_or_path in (None, self.reward_model_path),
                  "Set reward_model_path or reward_model_name_or_path, not both.")
            self.reward_model_name_or_path, self.reward_model_path = self.reward_model_path, None
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
            self.max_new_tokens = None  # consumed: a saved config then round-trips through max_completion_length
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_generations == 2, f"Online DPO ranks one pair of completions per prompt: num_generations "
                                         f"must be 2, got {self.num_generations}; remove num_generations or set 2.")
        check(self.loss_type in ONLINE_DPO_LOSS_TYPES,
              f"Unknown loss_type {self.loss_type!r} for Online DPO; choose one of: "
              f"{', '.join(ONLINE_DPO_LOSS_TYPES)}.")
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        check(all(b > 0 for b in betas), f"beta must be > 0 (every entry of a schedule), got {self.beta}.")
        check(self.per_device_train_batch_size % 2 == 0,
              f"per_device_train_batch_size counts completions (2 per prompt) and must be even so that a pair is "
              f"never split, got {self.per_device_train_batch_size}; TRL counts prompts: double TRL's value.")
        check(self.max_length > 0, f"max_length must be > 0, got {self.max_length}.")
        if self.max_completion_length >= self.max_length:
            import warnings

            warnings.warn(f"max_completion_length ({self.max_completion_length}) >= max_length ({self.max_length}): "
                          "the log-prob passes would keep no prompt token; raise max_length.", UserWarning,
                          stacklevel=3)
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}.")

    def beta_at_epoch(self, epoch: float) -> float:
        """β of epoch `epoch` (a list is one value per epoch, the last one reused after it)."""
        if isinstance(self.beta, list):
            return float(self.beta[min(int(epoch), len(self.beta) - 1)])
        return float(self.beta)
