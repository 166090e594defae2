"""`CPOConfig` and `ORPOConfig`: reference-free preference optimisation (CPO, SimPO, AlphaPO, ORPO), named as
TRL names them.

Not here: the losses (`losses/reference_free.py`), the trainers (`trainers/cpo.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import PostTrainConfig, check, max_tokens_per_backward_field, posttrain_config
from posttrain.losses.reference_free import CPO_LOSSES


@dataclass
class _ReferenceFreeConfig(PostTrainConfig):
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    beta: float = field(default=0.1, metadata={"help": "Scale of the preference term."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + completion, in tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Longest prompt; longer prompts keep "
                                          "their last tokens."})
    max_completion_length: int | None = field(default=None, metadata={"help": "Longest completion."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    max_tokens_per_backward: int | None = max_tokens_per_backward_field("chosen/rejected pairs")
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batch length to a multiple of this."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: the tokenizer's, "
                                  "else its EOS)."})
    generate_during_eval: bool = field(default=False, metadata={"help": "At each evaluation, sample completions for "
                                       "eval_batch_size random eval prompts and log them: a table in wandb / comet "
                                       "when report_to has them, and always lines in output_dir/"
                                       "eval_generations.jsonl (TRL logs to wandb or comet only)."})
    is_encoder_decoder: bool | None = field(default=None, metadata={"help": "TRL's switch for encoder-decoder "
                                            "models, which posttrain does not train: only None or False."})

    def validate(self) -> None:
        check(not self.is_encoder_decoder, "is_encoder_decoder=True: posttrain trains decoder-only (causal) models "
              "only; drop the option.")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}.")
        check(self.max_length is None or self.max_prompt_length is None or self.max_prompt_length < self.max_length,
              f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
              "so completions have room.")


@posttrain_config
@dataclass
class CPOConfig(_ReferenceFreeConfig):
    """Configuration of `CPOTrainer`: CPO (sigmoid), hinge, ipo, SimPO (simpo, cpo_alpha=0) and AlphaPO."""

    loss_type: str = field(default="sigmoid", metadata={"help": "One of: " + ", ".join(CPO_LOSSES) + ".",
                                                        "choices": list(CPO_LOSSES)})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label-flip probability in [0, 0.5)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL on chosen completions "
                             "(1 = CPO; 0 = pure SimPO)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin γ."})
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO reward-shape parameter (0 = SimPO's)."})

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo" and self.cpo_alpha == 1.0:
            self.cpo_alpha = 0.0  # AlphaPO is SimPO-shaped: no NLL term unless asked for (as in TRL)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check(self.loss_type in CPO_LOSSES,
              f"Unknown loss_type {self.loss_type!r} for CPO; choose one of: {', '.join(CPO_LOSSES)}.")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        check(self.cpo_alpha >= 0, f"cpo_alpha must be >= 0, got {self.cpo_alpha}.")


@posttrain_config
@dataclass
class ORPOConfig(_ReferenceFreeConfig):
    """Configuration of `ORPOTrainer`: NLL on chosen completions plus β × the odds-ratio term."""

    padding_value: int | None = field(default=None, metadata={"help": "Token id that pads input_ids (default: the "
                                      "tokenizer's pad token). Padding is masked out, so it changes no result."})
