"""`SFTConfig`: options of supervised fine-tuning, named as TRL names them.

Not here: how the options act (`data/prepare.py` for dataset preparation, `trainers/sft.py` for the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.compat import deprecated
from posttrain.configs.base import PostTrainConfig, check, posttrain_config
from posttrain.losses.sft import SFT_LOSSES

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


@posttrain_config
@dataclass
class SFTConfig(PostTrainConfig):
    """Configuration of `SFTTrainer` (every `transformers.TrainingArguments` field is accepted too)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    # data
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of a standard "
                                    "language-modelling dataset."})
    dataset_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra dataset options (JSON on the "
                                              "command line), e.g. '{\"skip_prepare_dataset\": true}'."})
    chat_template_path: str | None = field(default=None, metadata={"help": "A .jinja file or a tokenizer directory "
                                           "whose chat template replaces the tokenizer's."})
    eos_token: str | None = field(default=None, metadata={"help": "Token appended to standard text/completions "
                                  "(default: the tokenizer's EOS)."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: the tokenizer's, "
                                  "else its EOS)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate (or pack) sequences to this many "
                                   "tokens; None keeps them whole."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Deprecated alias of `max_length`."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start or keep_end.",
                                                                 "choices": ["keep_start", "keep_end"]})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into each max_length row "
                          "(documents cannot attend to each other)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "bfd (best-fit decreasing, truncates over-long "
                                  "examples), bfd_split (splits them) or wrapped (concatenate and cut).",
                                  "choices": list(PACKING_STRATEGIES)})
    padding_free: bool | None = field(default=None, metadata={"help": "Flatten each batch into one row with "
                                      "restarting position_ids instead of padding; each document then runs its own "
                                      "SDPA call (models/packed_attention.py). Default: on with packed_attention, "
                                      "unless model_init_kwargs asks for another attention implementation than "
                                      "sdpa."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batch length to a multiple of this."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the prepared dataset (seed: `seed`) — "
                                  "before packing too, so a packed row mixes unrelated examples; a streamed "
                                  "dataset is shuffled through a buffer. The sampler shuffles map-style data "
                                  "every epoch anyway."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval set (default: as `packing`)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "Train only on completions of "
                                              "prompt-completion data (default: on for such data)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Train only on assistant turns of "
                                      "conversational data."})
    loss_type: str = field(default="nll", metadata={"help": "nll (cross-entropy) or dft (Dynamic Fine-Tuning: "
                           "CE weighted by the detached token probability).", "choices": list(SFT_LOSSES)})

    def __post_init__(self) -> None:
        if self.max_seq_length is not None:
            deprecated("`max_seq_length` is deprecated and will be removed; use `max_length` instead.")
            self.max_length, self.max_seq_length = self.max_seq_length, None
        if isinstance(self.dataset_kwargs, str):
            import json

            self.dataset_kwargs = json.loads(self.dataset_kwargs)
        if self.loss_type == "chunked_nll":  # TRL's default name; our nll already runs the head on label tokens only
            self.loss_type = "nll"
        super().__post_init__()

    def validate(self) -> None:
        if self.padding_free is None:  # measured: 1.36x the padded step on SmolLM2 (benchmarks/RESULTS-smollm2.md)
            attention = (self.model_init_kwargs or {}).get("attn_implementation") or "sdpa"
            self.padding_free = attention == "sdpa" and self.packed_attention
        check(self.loss_type in SFT_LOSSES,
              f"Unknown loss_type {self.loss_type!r} for SFT; choose one of: {', '.join(SFT_LOSSES)}.")
        check(self.packing_strategy in PACKING_STRATEGIES,
              f"Unknown packing_strategy {self.packing_strategy!r}; choose one of: {', '.join(PACKING_STRATEGIES)}.")
        check(self.truncation_mode in ("keep_start", "keep_end"),
              f"truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}.")
        check(self.max_length is None or self.max_length > 0, f"max_length must be > 0, got {self.max_length}.")
        check(not self.packing or self.max_length is not None, "packing=True needs max_length (the row length).")
