"""`RewardTrainer`: a scalar reward model trained with the Bradley–Terry loss on preference pairs.

The model is a sequence classifier with one label (created from a causal-LM checkpoint when given a name); the
reward is its score at the last non-pad token. Over-long pairs are filtered out, not truncated.

Not here: the loss (`losses/reward_model.py`), data preparation (`data/prepare.py`).
"""

from __future__ import annotations

from typing import Any

from posttrain.configs.reward import RewardConfig
from posttrain.data.collators import DataCollatorForPreference  # noqa: F401  (TRL's import path)
from posttrain.data.prepare import filter_counted
from posttrain.errors import UserError
from posttrain.losses.reward_model import bradley_terry
from posttrain.trainers.preference import PreferenceTrainer


def _sequence_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


class RewardTrainer(PreferenceTrainer):
    """Same call form as TRL's: `RewardTrainer(model, args=RewardConfig(...), train_dataset=...)`."""

    config_class = RewardConfig
    method_name = "Reward"
    _tag_names = ["posttrain", "reward-trainer"]
    default_model_init_kwargs = {"num_labels": 1}
    summary_metrics = (("loss", "loss"), ("accuracy", "accuracy"), ("margin", "margin"))
    signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "margin"]
    tokenize_jointly = True

    def __init__(self, model, args: RewardConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, **kwargs: Any):
        self.auto_model_class = _sequence_classifier()
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config, peft_config=peft_config, **kwargs)
        num_labels = getattr(self.accelerator.unwrap_model(self.model).config, "num_labels", None)
        if num_labels != 1:
            raise UserError(f"A reward model scores with one output: reward models require `num_labels=1`, this one "
                            f"has {num_labels}. Load it "
                            "with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1).")

    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        # Tokenise whole pairs (no truncation: a reward model must see the full answer), then filter by length.
        max_length, args.max_length = args.max_length, None
        try:
            train_dataset, eval_dataset = super().prepare_datasets(train_dataset, eval_dataset, tokenizer, args)
        finally:
            args.max_length = max_length
        if max_length is None:
            return train_dataset, eval_dataset

        def keep_short(dataset, name):
            return filter_counted(dataset, lambda ex: len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]),
                                                                                  len(ex["rejected_ids"])) <= max_length,
                                  name, f"longer than max_length={max_length}", "Raise max_length.")

        return self.map_datasets(train_dataset, eval_dataset, keep_short)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).logits.squeeze(-1).float()
        half = rewards.shape[0] // 2
        per_pair, metrics = bradley_terry(rewards[:half], rewards[half:], inputs.get("margin"),
                                          self.args.center_rewards_coefficient)
        loss = self.reduce_pairs(per_pair, num_items_in_batch)
        self.record_metrics(metrics, weight=half)
        if self.model.training:
            self.add_tokens_seen(inputs["attention_mask"].sum())
        return (loss, {"rewards": rewards.detach()}) if return_outputs else loss
