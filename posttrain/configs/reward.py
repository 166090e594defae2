"""`RewardConfig`: options of Bradley–Terry reward modelling, named as TRL names them."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import PostTrainConfig, check, max_tokens_per_backward_field, posttrain_config


@posttrain_config
@dataclass
class RewardConfig(PostTrainConfig):
    """Configuration of `RewardTrainer` (every `transformers.TrainingArguments` field is accepted too)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    max_length: int | None = field(default=1024, metadata={"help": "Pairs with a prompt + completion longer than "
                                   "this are filtered out (not truncated: a cut answer would be judged wrongly)."})
    center_rewards_coefficient: float | None = field(default=None, metadata={"help": "Weight of the penalty "
                                                     "(r_chosen + r_rejected)² that keeps rewards centred on 0."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    max_tokens_per_backward: int | None = max_tokens_per_backward_field("chosen/rejected pairs")
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batch length to a multiple of this."})
    chat_template_path: str | None = field(default=None, metadata={"help": "A .jinja file or a tokenizer directory "
                                           "whose chat template replaces the tokenizer's."})
    eos_token: str | None = field(default=None, metadata={"help": "Token that ends each standard (non-chat) text, "
                                  "appended when missing (default: the tokenizer's EOS)."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: the tokenizer's, "
                                  "else its EOS)."})

    def validate(self) -> None:
        check(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
              f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}.")
