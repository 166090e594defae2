"""`DistillationConfig` and `GKDConfig`: on-policy distillation and Generalized Knowledge Distillation, named as
TRL 1.16 names them (its stable `DistillationConfig`, its experimental `GKDConfig`).

Both are siblings of the online configs (`configs/online.py`): the same generation, vLLM, batching and tool options
as GRPO; a generation batch of per_device_train_batch_size × steps_per_generation completions (one per prompt by
default, as TRL) reused for num_iterations passes. What a distillation run has no use for — reward functions, the
reference model's TR-DPO sync — is refused in one line naming the trainers that take it; GKD (as TRL's) also has no
tool-calling rollouts.

The teacher: `teacher_model_name_or_path` (or the trainer's `teacher_model=`), loaded with
`teacher_model_init_kwargs`. `beta` selects the divergence (0 forward KL, 0.5 JSD, 1 reverse KL: `losses/distill.py`).
`teacher_top_k` (posttrain's own) keeps only the teacher's k most likely tokens per position (+ one bucket for the
rest) instead of its whole distribution.

Not here: the loss (`losses/distill.py`), the teacher (`models/teacher.py`), the trainers (`trainers/distillation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configs.base import check, json_option, posttrain_config
from posttrain.configs.online import ToolRolloutConfig


def _refused(default):
    """A field inherited from the shared rollout part that this config does not take: kept (with its default) so the
    shared machinery can read it, but not an argument, so passing it is refused naming the trainers that take it."""
    return field(default=default, init=False, repr=False)


@posttrain_config
@dataclass
class DistillationConfig(ToolRolloutConfig):
    """Configuration of `DistillationTrainer`: the shared rollout options (`configs/online.py`), every
    `transformers.TrainingArguments` field, and the teacher and divergence options below."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    num_generations: int = field(default=1, metadata={"help": "Completions the student samples per prompt (TRL "
                                 "samples 1)."})
    max_completion_length: int = field(default=512, metadata={"help": "Most tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, and the temperature of both "
                               "distributions in the divergence."})
    beta: float = field(default=1.0, metadata={"help": "Generalized JSD coefficient: 0 = forward KL(teacher ‖ "
                        "student), 0.5 = JSD, 1 = reverse KL(student ‖ teacher). It selects the divergence; there "
                        "is no reference model."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The teacher (Hub id, local "
                                                   "directory, GGUF file or built-in name) when the trainer is "
                                                   "given no teacher_model. It must share the student's tokenizer."})
    teacher_model_revision: str | None = field(default=None, metadata={"help": "Revision of the teacher on the Hub."})
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata={"help": "Keyword arguments of "
                                                         "`from_pretrained` for a teacher given by name (JSON on the "
                                                         "command line), e.g. '{\"dtype\": \"bfloat16\"}'."})
    teacher_top_k: int | None = field(default=None, metadata={"help": "Keep only the teacher's k most likely tokens "
                                      "per position, plus one bucket for all other tokens, and compute the "
                                      "divergence over those k + 1 outcomes (a lower bound of the exact one; stores "
                                      "k log-probs per token instead of the teacher's hidden states). None: exact."})

    # the shared rollout part's options that distillation has no use for
    reward_funcs: list[str] | None = _refused(None)
    reward_weights: list[float] | None = _refused(None)
    reward_model_name_or_path: str | None = _refused(None)
    sync_ref_model: bool = _refused(False)
    ref_model_sync_steps: int = _refused(512)
    ref_model_mixup_alpha: float = _refused(0.6)

    def __post_init__(self) -> None:
        self.teacher_model_init_kwargs = json_option(self.teacher_model_init_kwargs, "teacher_model_init_kwargs")
        super().__post_init__()

    def validate(self) -> None:
        check(0.0 <= self.beta <= 1.0, f"beta must be in [0, 1] (0 forward KL, 0.5 JSD, 1 reverse KL), got "
                                       f"{self.beta}.")
        check(self.num_generations >= 1, f"num_generations must be >= 1, got {self.num_generations}.")
        check(self.teacher_top_k is None or self.teacher_top_k >= 1, f"teacher_top_k must be >= 1 (or None for the "
                                                                     f"exact divergence), got {self.teacher_top_k}.")

    def teacher_init_kwargs(self) -> dict:
        """`from_pretrained` keyword arguments of a teacher given by name: teacher_model_init_kwargs and the revision
        (custom model code: '{"trust_remote_code": true}')."""
        kwargs = dict(self.teacher_model_init_kwargs or {})
        if self.teacher_model_revision is not None:
            kwargs.setdefault("revision", self.teacher_model_revision)
        return kwargs


@posttrain_config
@dataclass
class GKDConfig(DistillationConfig):
    """Configuration of `GKDTrainer` (Agarwal et al. 2024): a fraction `lmbda` of generation batches are sampled by
    the student, the rest take the dataset's completions (or, with `seq_kd`, the teacher's samples)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate (TRL's GKDConfig "
                                 "keeps its SFTConfig's default, 2e-5)."})
    max_completion_length: int = field(default=128, metadata={"help": "Most tokens generated per completion."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "TRL's name for max_completion_length (sets "
                                       "it when given)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the student (and of the "
                               "teacher under seq_kd). As TRL's GKDTrainer, the divergence compares the models' own "
                               "distributions (temperature 1)."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD coefficient: 0 = forward KL, 0.5 = JSD, "
                        "1 = reverse KL."})
    lmbda: float = field(default=0.5, metadata={"help": "Share of generation batches whose completions the student "
                         "samples (on-policy); the others use the dataset's completions (or the teacher's, seq_kd)."})
    seq_kd: bool = field(default=False, metadata={"help": "Sequence-level KD: the batches that are not on-policy "
                         "take completions sampled from the teacher instead of the dataset's."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the student to 0."})

    # TRL's GKDTrainer has no tool-calling rollouts
    tools: list[str] | None = _refused(None)
    environment_factory: str | None = _refused(None)
    max_tool_calling_iterations: int | None = _refused(None)
    tool_call_timeout: float | None = _refused(30.0)

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
            self.max_new_tokens = None  # consumed: a saved config round-trips through max_completion_length
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.lmbda <= 1.0, f"lmbda must be in [0, 1] (the share of on-policy batches), got {self.lmbda}.")
