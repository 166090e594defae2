"""`DistillationTrainer` (on-policy distillation) and `GKDTrainer` (Generalized Knowledge Distillation), Agarwal et
al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", with TRL 1.16's names
and call forms: `DistillationTrainer(model, teacher_model, args=DistillationConfig(...), train_dataset=...)`.

Both are online trainers of the shared shape (`trainers/online.py`): the base samples a generation batch through the
rollout engine (HF or vLLM, tools included for DistillationTrainer) — nothing is scored, there are no rewards — and
the method's one hook, `training_batches`, runs the teacher once over the rollout without gradients (a timed
"teacher" phase: its hidden states at the trained tokens, or its top-k log-probs, `models/teacher.py`) and splits it
into micro-batches. The loss is the per-token generalized JSD(β) between the two next-token distributions over the
trained completion tokens (`losses/distill.py`), reduced over every trained token of the optimizer step.

GKD differs in where completions come from. Per generation batch, with probability `lmbda` the student samples them
(on-policy); otherwise they are the dataset's completions (prompt-completion or messages data), or with `seq_kd` the
teacher's samples. That choice is made in `sample` — the one place a rollout's tokens come from — so the dataset's
completions become an ordinary `Rollout` and the hook, loss and reduction are shared. The choice is drawn from the
seed and the micro-step, so every process makes the same one and a resumed run the same as an uninterrupted one.
TRL draws it per micro-batch; here a generation batch holds gradient_accumulation_steps micro-batches (the same
when gradient_accumulation_steps = 1). As TRL's GKDTrainer, GKD's divergence uses temperature 1 (its `temperature`
is the sampling temperature); DistillationTrainer's uses `temperature` for both.

Not here: the rollout cycle (`trainers/online.py`), the teacher's passes (`models/teacher.py`), the maths
(`losses/distill.py`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from posttrain.configs.distillation import DistillationConfig, GKDConfig
from posttrain.data.tokenize import tokenize_prompt_and_completions
from posttrain.errors import UserError, UserTypeError
from posttrain.models import teacher as teachers
from posttrain.models.logprobs import output_head
from posttrain.rollout.hf import left_pad
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer

logger = logging.getLogger(__name__)


class DistillationTrainer(OnlineTrainer):
    """On-policy distillation: the student samples, the teacher scores every token of what it sampled."""

    config_class = DistillationConfig
    method_name = "Distillation"
    supports_tools = True
    scores_rollouts = False
    needs_reward_funcs = False
    summary_metrics = (("loss", "divergence"), ("completions/mean_length", "completion length"))

    def __init__(self, model, teacher_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, tools=None, **kwargs: Any):
        name = type(self).__name__
        for key, why in (("reward_funcs", "the teacher's next-token distribution is the training signal"),
                         ("ref_model", "the teacher takes its place (teacher_model=)")):
            if key in kwargs:
                raise UserTypeError(f"{name} does not take {key}=: {why}.")
        if quantization_config is not None:  # TRL's script passes one (None unless a 4/8-bit student is asked for)
            if not isinstance(model, str):
                logger.warning("quantization_config is ignored: the model is already loaded.")
            elif args is None:
                raise UserTypeError(f"{name}(quantization_config=...) needs args=DistillationConfig(...) to carry it; "
                                    "or set model_init_kwargs={'quantization_config': ...}.")
            else:
                args.model_init_kwargs = {**(args.model_init_kwargs or {}), "quantization_config": quantization_config}
        super().__init__(model, None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
                         optimizers=optimizers, tools=tools, **kwargs)
        self.teacher_model = teachers.build_teacher(self, teacher_model)

    # ---- what the base asks -----------------------------------------------------------------------------------
    def holds_reference(self) -> bool:
        return False  # `beta` selects the divergence here; there is no reference model

    def no_reference_reason(self) -> str:
        return f"{type(self).__name__} has a teacher, not a reference"

    uses_old_logps = False  # the loss compares with the teacher, not with the sampling policy

    def divergence_temperature(self) -> float:
        """The temperature of both distributions in the divergence."""
        return self.args.temperature

    # ---- the hook and the loss --------------------------------------------------------------------------------
    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """The rollout's tokens plus the teacher's columns (hidden states at the trained tokens, or top-k
        log-probs), shuffled into micro-batches."""
        batch = self.rollout_tensors(rollout)
        with self.phase("teacher"):
            batch.update(teachers.teacher_columns(self.teacher_model, batch, self.args.per_device_train_batch_size,
                                                  self.args.teacher_top_k, self.divergence_temperature()))
        return self.cycle(self.split(batch))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        head = output_head(self.accelerator.unwrap_model(self.teacher_model))
        terms, metrics = teachers.divergence_terms(model, inputs, head, args.beta, self.divergence_temperature(),
                                                   pack_rows=self.pack_log_prob_rows)
        loss = self.reduce_loss(terms, "token", inputs)
        self.record_metrics(metrics)
        return (loss, {}) if return_outputs else loss


class GKDTrainer(DistillationTrainer):
    """Generalized Knowledge Distillation: `lmbda` of the generation batches on-policy, the rest from the dataset
    (or the teacher, `seq_kd`). Same call form as TRL's: `GKDTrainer(model, teacher_model, args=GKDConfig(...),
    train_dataset=...)`."""

    config_class = GKDConfig
    method_name = "GKD"
    supports_tools = False

    def __init__(self, model=None, teacher_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None, formatting_func=None,
                 **kwargs: Any):
        for key, value, why in (("formatting_func", formatting_func, "it reads prompt-completion or messages rows "
                                 "(TRL's GKDTrainer skips SFT's formatting too); map the dataset to those columns"),
                                ("data_collator", data_collator, "its batches are rollouts (sampled, or the dataset's "
                                 "rows tokenised as completions); remove it")):
            if value is not None:
                raise UserTypeError(f"GKDTrainer does not take {key}=: {why}.")
        for key, value in (("compute_metrics", compute_metrics),
                           ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):
            if value is not None:
                kwargs[key] = value
        super().__init__(model, teacher_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config, **kwargs)

    def divergence_temperature(self) -> float:
        return 1.0  # as TRL's GKDTrainer: `temperature` is the sampling temperature only

    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        """Messages data becomes prompt (every turn but the last) + completion (the final assistant turn); the
        dataset's completions are needed unless every batch is sampled (lmbda = 1 or seq_kd)."""
        needs_completions = args.lmbda < 1.0 and not args.seq_kd

        def prepare(dataset, name):
            columns = list(dataset.column_names or [])
            if "prompt" not in columns and "messages" in columns:
                dataset = dataset.map(_split_last_turn, remove_columns=["messages"])
            if needs_completions and "completion" not in (dataset.column_names or []):
                raise UserError(f"GKDTrainer with lmbda={args.lmbda} trains on the {name} dataset's completions in "
                                f"{1 - args.lmbda:.0%} of the batches, but it has no 'completion' column (columns: "
                                f"{columns}); give prompt-completion or messages data, or set lmbda=1 or seq_kd.")
            return dataset

        train_dataset, eval_dataset = self.map_datasets(train_dataset, eval_dataset, prepare)
        return super().prepare_datasets(train_dataset, eval_dataset, tokenizer, args)

    def _prompt_ids(self, prompt, row_template_kwargs: dict | None = None) -> list[int]:
        """A sampled batch's prompt ids, also kept to their last max_length tokens (TRL's GKD cuts every row)."""
        ids = super()._prompt_ids(prompt, row_template_kwargs)
        return ids[-self.args.max_length:] if self.args.max_length else ids

    def batch_source(self) -> str:
        """Where this generation batch's completions come from: "student" (probability lmbda), else "teacher"
        (seq_kd) or "dataset". Drawn from (seed, micro-step); evaluation uses the dataset's when it has them."""
        args = self.args
        if not self.model.training:
            return "dataset" if args.lmbda < 1.0 and not args.seq_kd else "student"
        if random.Random(args.seed * 1_000_003 + self._micro_step).random() < args.lmbda:
            return "student"
        return "teacher" if args.seq_kd else "dataset"

    def sample(self, rows: list[dict[str, Any]]) -> Rollout:
        source = self.batch_source()
        if self.model.training:
            self.record_metrics({"on_policy": float(source == "student")})
        if source == "student":
            return super().sample(rows)
        if source == "teacher":
            prompts = [self._prompt_ids(r["prompt"], r.get("chat_template_kwargs")) for r in rows]
            return self.generate_completions(prompts, 1, model=self.teacher_model)
        return self.dataset_rollout(rows)

    def dataset_rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """The dataset's completions of `rows` as a Rollout: prompts tokenised as for generation (the last
        max_prompt_length tokens), completions as the model would write them (EOS or the chat template's end of
        turn), cut at max_completion_length (then marked truncated); a row longer than max_length keeps its last
        max_length tokens, as TRL's GKD collator."""
        tok, limit, args = self.processing_class, self.args.max_completion_length, self.args
        prompt_ids, completion_ids, truncated = [], [], []
        for row in rows:
            template_kwargs = {**(args.chat_template_kwargs or {}), **(row.get("chat_template_kwargs") or {})}
            ids, (completion,) = tokenize_prompt_and_completions(tok, row["prompt"], [row["completion"]],
                                                                 tok.eos_token, chat_template_kwargs=template_kwargs)
            ids = ids[-args.max_prompt_length:] if args.max_prompt_length else ids
            truncated.append(len(completion) > limit)
            completion = completion[:limit]
            overflow = len(ids) + len(completion) - (args.max_length or len(ids) + len(completion))
            if overflow > 0:  # as TRL's GKD collator: the last max_length tokens (the prompt's start goes first)
                kept = (ids + completion)[-args.max_length:]
                cut = max(1, len(ids) - overflow)  # a prompt token at least: the first kept one has no target
                ids, completion = kept[:cut], kept[cut:]
            prompt_ids.append(ids)
            completion_ids.append(completion)
        prompt, prompt_mask = left_pad(prompt_ids, tok.pad_token_id)
        width = max(1, min(limit, max(len(c) for c in completion_ids)))
        completion = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(completion_ids):
            completion[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, :len(ids)] = 1
        truncated = torch.tensor(truncated)
        return Rollout(prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=completion,
                       completion_mask=completion_mask, is_truncated=truncated)


def _split_last_turn(example: dict[str, Any]) -> dict[str, Any]:
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError(f"GKDTrainer takes messages data whose last turn is the assistant's (the completion); got a "
                        f"conversation ending with {messages[-1].get('role') if messages else 'nothing'!r}.")
    return {"prompt": messages[:-1], "completion": messages[-1:]}
