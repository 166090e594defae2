"""`DPOConfig`: options of Direct Preference Optimization and its loss family, named as TRL names them.

Not here: the losses (`losses/preference.py`), data preparation (`data/prepare.py`), the trainer (`trainers/dpo.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.anchored import ReferenceAnchoredConfig
from posttrain.configs.base import check, max_tokens_per_backward_field, posttrain_config
from posttrain.losses.preference import DPO_LOSSES, F_DIVERGENCES


@posttrain_config
@dataclass
class DPOConfig(ReferenceAnchoredConfig):
    """Configuration of `DPOTrainer` (every `transformers.TrainingArguments` field is accepted too)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (DPO's β; "
                        "τ for IPO)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "One or more of: " + ", ".join(DPO_LOSSES) + ". Several are summed with loss_weights "
                "(e.g. sigmoid sft = RPO)."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each loss_type (default 1)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Probability that a preference label is flipped "
                                   "(cDPO/robust/aot/exo_pair), in [0, 0.5)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "Divergence of the implicit reward: "
                                   + ", ".join(F_DIVERGENCES) + ".", "choices": list(F_DIVERGENCES)})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "α of alpha_divergence."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO: weight pairs by their probability under the "
                                "current policy."})
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO: weight of tokens past the shorter "
                                   "completion's length (1 = plain DPO)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    padding_free: bool | None = field(default=None, metadata={"help": "Run each padded batch as one row without its "
                                      "padding (documents separated by restarting position_ids; same results). "
                                      "None (default): when the model runs posttrain's packed attention and it "
                                      "saves tokens; False: always padded (TRL's default); True: as None, and "
                                      "refused when the model cannot run packed rows (packed_attention off, or "
                                      "another attention implementation than sdpa)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start (completions are cut at "
                                 "the end).", "choices": ["keep_start", "keep_end"]})
    max_tokens_per_backward: int | None = max_tokens_per_backward_field("chosen/rejected pairs")

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        super().__post_init__()

    def validate(self) -> None:
        check(not (self.max_tokens_per_backward and any(n.startswith("aot") for n in self.loss_type)),
              "max_tokens_per_backward cannot be combined with aot losses (they sort over the whole batch, so a "
              "slice of pairs is not its share of the loss); drop one of them.")
        for name in self.loss_type:
            check(name in DPO_LOSSES, f"Unknown loss_type {name!r} for DPO; choose from: {', '.join(DPO_LOSSES)}.")
        check(self.loss_weights is None or len(self.loss_weights) == len(self.loss_type),
              f"loss_weights has {len(self.loss_weights or [])} entries but loss_type has {len(self.loss_type)}.")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}.")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        check(self.f_divergence_type in F_DIVERGENCES,
              f"Unknown f_divergence_type {self.f_divergence_type!r}; choose from: {', '.join(F_DIVERGENCES)}.")
        check(not (self.use_weighting and any(n.startswith("aot") for n in self.loss_type)),
              "use_weighting cannot be combined with aot losses (sorting breaks the pairing).")
        check(not (self.precompute_ref_log_probs and self.sync_ref_model),
              "precompute_ref_log_probs and sync_ref_model exclude each other (a synced reference changes).")
        attention = (self.model_init_kwargs or {}).get("attn_implementation") or "sdpa"
        check(not self.padding_free or (self.packed_attention and attention == "sdpa"),
              "padding_free=True runs batches as packed rows, which needs packed_attention=True and sdpa attention "
              f"(attn_implementation={attention!r}, packed_attention={self.packed_attention}); drop padding_free.")
        check(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, f"ld_alpha must be in [0, 1], got {self.ld_alpha}.")
        check(self.max_length is None or self.max_prompt_length is None or self.max_prompt_length < self.max_length,
              f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
              "so completions have room.")
