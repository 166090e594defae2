"""`KTOConfig`: options of Kahneman-Tversky Optimization and its unpaired loss family, named as TRL names them.

Deliberate difference from TRL: no `train_sampling_strategy="sequential"` default. TRL bakes each example's
mismatched KL completion into the dataset and must keep batches in dataset order; we build the mismatched pairs
from each collated batch (`data/collators.py`), so the sampler may shuffle. `train_sampling_strategy="sequential"`
still works and reproduces TRL's pairs exactly.

Not here: the losses (`losses/kto.py`), data preparation (`data/prepare.py`), the trainer (`trainers/kto.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.anchored import ReferenceAnchoredConfig
from posttrain.configs.base import check, check_bounds, posttrain_config
from posttrain.losses.kto import KTO_LOSSES, USES_KL_BASELINE


@posttrain_config
@dataclass
class KTOConfig(ReferenceAnchoredConfig):
    """Configuration of `KTOTrainer` (every `transformers.TrainingArguments` field is accepted too)."""

    loss_type: str = field(default="kto", metadata={"help": "One of: " + ", ".join(KTO_LOSSES) + ".",
                                                    "choices": list(KTO_LOSSES)})
    desirable_weight: float = field(default=1.0, metadata={"help": "λ_D, weight of desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "λ_U, weight of undesirable examples' losses. "
                                      "The KTO paper recommends λ_D·n_D / (λ_U·n_U) in [1, 4/3]."})

    def validate(self) -> None:
        check(self.loss_type in KTO_LOSSES,
              f"Unknown loss_type {self.loss_type!r} for KTO; choose one of: {', '.join(KTO_LOSSES)}.")
        check_bounds(self, "beta > 0", "desirable_weight > 0", "undesirable_weight > 0")
        check(self.loss_type not in USES_KL_BASELINE or self.per_device_train_batch_size > 1,
              f"per_device_train_batch_size must be > 1 for loss_type={self.loss_type!r}, got "
              f"{self.per_device_train_batch_size}: the KL baseline pairs each prompt with another example's "
              "completion from the same batch. Raise it, or use loss_type='apo_zero_unpaired' (no KL term).")
        check(not (self.precompute_ref_log_probs and self.sync_ref_model),
              "precompute_ref_log_probs and sync_ref_model exclude each other (a synced reference changes).")
        check(self.ref_model_sync_steps >= 1, f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}.")
        check(0 < self.ref_model_mixup_alpha <= 1,
              f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}.")
        check(self.max_length is None or self.max_prompt_length is None or self.max_prompt_length < self.max_length,
              f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
              "so completions have room.")
