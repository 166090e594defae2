"""`PreferenceTrainer`: what every pairwise method (DPO, CPO/SimPO, ORPO) shares — preference data in,
one (2B, T) batch with chosen rows first, completion log-probs per sequence, pair counting for the global
normaliser, and the rewards/logps/logits metrics that TRL logs.

Not here: the losses (`losses/`), reference models (DPO only: `trainers/dpo.py`).
"""

from __future__ import annotations

import json
import os
import random

import torch

from posttrain.data.collators import DataCollatorForPreference
from posttrain.data.prepare import prepare_preference_dataset
from posttrain.losses.reduce import global_sum_reduce
from posttrain.models.logprobs import IGNORE_INDEX, batch_labels
from posttrain.trainers.base import PostTrainer
from posttrain.trainers.slices import token_slices


class PreferenceTrainer(PostTrainer):
    summary_metrics = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"))
    signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    vision_data = "preference"  # trainers/vision.py
    tokenize_jointly = False  # reward models tokenise prompt + completion as one text
    requires_train_dataset = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._signature_columns = list(self.signature_columns)

    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        def prepare(dataset, name):
            return prepare_preference_dataset(dataset, tokenizer, args, name, type(self).__name__,
                                              joint=self.tokenize_jointly)

        return self.map_datasets(train_dataset, eval_dataset, prepare)

    def default_collator(self, tokenizer, args):
        pad = getattr(args, "padding_value", None)  # ORPO's explicit pad id
        return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id if pad is None else pad,
                                         pad_to_multiple_of=args.pad_to_multiple_of)

    def count_loss_items(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def backward_slices(self, inputs, budget: int):
        """`max_tokens_per_backward`: slices of whole pairs (a pair's chosen and rejected rows together); exact, as a
        pair's loss is divided by the step's pair count (`reduce_pairs`). The chosen NLL's token mean stays the whole
        micro-batch's (`chosen_length_mean`, read by `losses.preference.sft`)."""
        parts = token_slices(inputs, budget, paired=True)
        if len(parts) > 1 and ("labels" in inputs or "completion_mask" in inputs):
            trained = batch_labels(inputs)[:, 1:] != IGNORE_INDEX  # the targets the log-prob pass scores
            mean = trained[:trained.shape[0] // 2].sum(-1).float().mean()
            for part in parts:
                part["chosen_length_mean"] = mean
        return parts

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


@torch.no_grad()
def log_eval_generations(trainer, dataset) -> list[dict[str, str]]:
    """`generate_during_eval`: sample completions for `eval_batch_size` random prompts of the (prepared) eval set,
    append them to output_dir/eval_generations.jsonl (one line per prompt, with the step), and log them as a
    "game_log" table to wandb / comet when report_to has them. Returns the rows."""
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        return []
    tokenizer, model = trainer.processing_class, trainer.model
    picks = random.Random(trainer.args.seed + trainer.state.global_step).sample(
        range(len(dataset)), k=min(trainer.args.eval_batch_size, len(dataset)))
    prompts = [list(dataset[i]["prompt_ids"]) for i in picks]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=trainer.args.device)  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=trainer.args.device)
    unwrapped = trainer.accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    new_tokens = max((trainer.args.max_length or width + 64) - width, 1)
    out = unwrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                             pad_token_id=pad)
    unwrapped.train(was_training)
    rows = [{"step": trainer.state.global_step, "prompt": tokenizer.decode(p, skip_special_tokens=True),
             "policy": tokenizer.decode(o[width:], skip_special_tokens=True)} for p, o in zip(prompts, out)]
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, "eval_generations.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        report_to = trainer.args.report_to or []
        table = [[r["prompt"], r["policy"]] for r in rows]
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"game_log": wandb.Table(columns=["Prompt", "Policy"], data=table)})
        if "comet_ml" in report_to:
            import comet_ml

            experiment = comet_ml.get_running_experiment()
            if experiment is not None:
                experiment.log_table("game_log.csv", tabular_data=table, headers=["Prompt", "Policy"])
    return rows
