"""`PreferenceTrainer`: what every pairwise method (DPO, CPO/SimPO, ORPO) shares — preference data in,
one (2B, T) batch with chosen rows first, completion log-probs per sequence, pair counting for the global
normaliser, and the rewards/logps/logits metrics that TRL logs.

Not here: the losses (`losses/`), reference models (DPO only: `trainers/dpo.py`).
"""

from __future__ import annotations

import torch

from posttrain.data.collators import DataCollatorForPreference
from posttrain.data.prepare import prepare_preference_dataset
from posttrain.losses.reduce import global_sum_reduce
from posttrain.trainers.base import PostTrainer


class PreferenceTrainer(PostTrainer):
    summary_metrics = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"))
    signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    vision_data = "preference"  # trainers/vision.py
    tokenize_jointly = False  # reward models tokenise prompt + completion as one text

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._signature_columns = list(self.signature_columns)

    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        def prepare(dataset, name):
            return prepare_preference_dataset(dataset, tokenizer, args, name, type(self).__name__,
                                              joint=self.tokenize_jointly)

        return self.map_datasets(train_dataset, eval_dataset, prepare)

    def default_collator(self, tokenizer, args):
        return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                         pad_to_multiple_of=args.pad_to_multiple_of)

    def count_loss_items(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def reduce_pairs(self, per_pair: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        if num_items_in_batch is None:
            return per_pair.mean()
        return global_sum_reduce(per_pair, num_items_in_batch, self.accelerator.num_processes)

    @torch.no_grad()
    def record_pair_metrics(self, out: dict[str, torch.Tensor], policy: torch.Tensor,
                            chosen_rewards: torch.Tensor | None, rejected_rewards: torch.Tensor | None,
                            extra: dict[str, torch.Tensor], inputs) -> None:
        """rewards/*, logps/* (per pair), logits/* and mean_token_accuracy (per completion token), num_tokens.
        With rewards None, the rewards/* metrics are expected in `extra` (reference-free losses define them)."""
        half = policy.shape[0] // 2
        metrics = {"logps/chosen": policy[:half].detach().mean(), "logps/rejected": policy[half:].detach().mean(),
                   **extra}
        if chosen_rewards is not None:
            metrics.update({
                "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean()})
        self.record_metrics(metrics, weight=half)
        rows = out["mask"].nonzero(as_tuple=True)[0]  # row of each trained token, in the order of out["targets"]
        is_chosen = rows < half
        for key, select in (("logits/chosen", is_chosen), ("logits/rejected", ~is_chosen)):
            if select.any():
                self.record_metrics({key: out["logits_mean"][select].mean()}, weight=float(select.sum()))
        chosen_correct = out["correct"][is_chosen]
        if len(chosen_correct):
            self.record_metrics({"mean_token_accuracy": chosen_correct.float().mean()},
                                weight=float(len(chosen_correct)))
        if self.model.training:
            self.add_tokens_seen(inputs["attention_mask"].sum())
