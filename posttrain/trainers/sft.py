"""`SFTTrainer`: supervised fine-tuning on language-modelling or prompt-completion data.

The loss is a token-level loss (`losses/sft.py`: nll or dft) over the trained tokens, divided by the number of
trained tokens in the whole accumulated batch on all processes — so gradient accumulation and data parallelism
give the same loss as one big batch. The LM head runs only on positions that predict a trained token.

Not here: data preparation (`data/prepare.py`), collation (`data/collators.py`), log-prob maths (`models/logprobs.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posttrain.configs.sft import SFTConfig
from posttrain.data.collators import DataCollatorForLanguageModeling
from posttrain.data.prepare import prepare_sft_dataset
from posttrain.errors import UserError
from posttrain.losses.reduce import global_sum_reduce
from posttrain.losses.sft import SFT_LOSSES
from posttrain.models.logprobs import forward_target_rows, token_logps
from posttrain.models.vision import image_inputs
from posttrain.trainers.base import PostTrainer


class SFTTrainer(PostTrainer):
    """Supervised fine-tuning. Same call form as TRL's: `SFTTrainer(model, args=SFTConfig(...), train_dataset=...)`.

    `model` is a model or a name (Hub id, local path, built-in `posttrain/tiny`); `formatting_func(example) -> str`
    turns raw rows into text.
    """

    config_class = SFTConfig
    method_name = "SFT"
    _tag_names = ["posttrain", "sft"]
    requires_train_dataset = True
    accepts_compute_loss_func = True
    vision_data = "sft"

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_loss_func: Callable | None = None,
                 compute_metrics=None, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, quantization_config=None, peft_config=None,
                 formatting_func: Callable | None = None, **kwargs: Any):
        self.formatting_func = formatting_func
        if compute_loss_func is not None and getattr(args, "loss_type", "nll") == "dft":
            raise UserError("compute_loss_func replaces the loss, and loss_type='dft' sets it: give one of them.")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config, peft_config=peft_config, **kwargs)
        if self.args.remove_unused_columns:
            # prepared rows carry what the collator needs (seq_lengths and completion_mask are not model inputs)
            self._signature_columns = ["input_ids", "labels", "seq_lengths", "completion_mask", "attention_mask",
                                       "position_ids"]
        self.loss_fn = SFT_LOSSES[self.args.loss_type]

    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing

        def prepare(dataset, name):
            packing = args.packing if name == "train" else eval_packing
            return prepare_sft_dataset(dataset, tokenizer, args, self.formatting_func, packing, name)

        return self.map_datasets(train_dataset, eval_dataset, prepare)

    def default_collator(self, tokenizer, args):
        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                               completion_only_loss=args.completion_only_loss is not False,
                                               padding_free=args.padding_free,
                                               pad_to_multiple_of=args.pad_to_multiple_of)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self.compute_loss_func is not None:
            return self._custom_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        full_logits = return_outputs and self.compute_metrics is not None
        if full_logits:  # compute_metrics wants (B, T, V) logits aligned with labels
            output = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                           position_ids=inputs.get("position_ids"), use_cache=False, **image_inputs(inputs))
            shifted = labels[:, 1:]
            valid = shifted != -100
            logits, targets = output.logits[:, :-1][valid], shifted[valid]
            hidden = head = None
        else:  # the head runs on the trained rows only, in chunks on long batches (models/logprobs.py)
            hidden, head, logits, targets, _, output = forward_target_rows(model, inputs["input_ids"], labels,
                                                                           inputs.get("attention_mask"),
                                                                           inputs.get("position_ids"),
                                                                           **image_inputs(inputs))
        stats = token_logps(logits, targets, with_entropy=True, with_metrics=True, hidden=hidden, head=head)
        del logits  # the fused pass keeps what its backward needs; the (N, V) logits can go now
        logps = stats["logps"]
        per_token, extra = self.loss_fn(logps)
        n = targets.numel()
        if num_items_in_batch is None:
            loss = per_token.sum() / max(n, 1)
        else:
            loss = global_sum_reduce(per_token, num_items_in_batch, self.accelerator.num_processes)
        with torch.no_grad():
            if n:
                accuracy = stats["correct"].float().mean()
                entropy = stats["entropy"].mean()
                self.record_metrics({"mean_token_accuracy": accuracy, "entropy": entropy, **extra}, weight=n)
        if self.model.training:
            mask = inputs.get("attention_mask")
            self.add_tokens_seen(mask.sum() if mask is not None else inputs["input_ids"].numel())
        return (loss, output) if return_outputs else loss

    def _custom_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        """transformers' `compute_loss_func` contract: the model's own outputs (with (B, T, V) logits, no labels
        given to the model) and the labels go to `compute_loss_func(outputs, labels, num_items_in_batch=...)`, which
        normalises by `num_items_in_batch` (the trained tokens of the whole accumulated batch on all processes)."""
        labels = inputs["labels"]
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False)
        loss = self.compute_loss_func(output, labels, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
        with torch.no_grad():
            shifted = labels[:, 1:]
            valid = shifted != -100
            n = int(valid.sum())
            if n:
                correct = output.logits[:, :-1].argmax(-1)[valid] == shifted[valid]
                self.record_metrics({"mean_token_accuracy": correct.float().mean()}, weight=n)
        if self.model.training:
            mask = inputs.get("attention_mask")
            self.add_tokens_seen(mask.sum() if mask is not None else inputs["input_ids"].numel())
        return (loss, output) if return_outputs else loss
