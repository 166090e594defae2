"""Options shared by offline methods anchored to a frozen reference model (DPO, KTO): sequence limits, how the
reference is held (live copy, adapters off, precomputed log-probs, TR-DPO sync), padding.

Not here: the per-method losses and their knobs (`configs/dpo.py`, `configs/kto.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import PostTrainConfig


@dataclass
class ReferenceAnchoredConfig(PostTrainConfig):
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (β)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + completion, in tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Longest prompt; longer prompts keep "
                                          "their last tokens."})
    max_completion_length: int | None = field(default=None, metadata={"help": "Longest completion."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute reference log-probs once "
                                           "before training (cached on disk) and hold no reference model."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Batch size of that pass."})
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO: mix the policy into the reference "
                                 "every ref_model_sync_steps steps."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference updates."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref ← α·policy + (1−α)·ref."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in policy and reference."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batch length to a multiple of this."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: the tokenizer's, "
                                  "else its EOS)."})
