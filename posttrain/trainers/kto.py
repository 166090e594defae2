"""`KTOTrainer`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) and APO-zero on unpaired data.

Each example is one completion labelled desirable or undesirable. The loss compares the policy/reference log-ratio
Δ of the completion with the KL baseline z0, estimated from mismatched pairs (x_i, y_{i-1}) of the same batch
(rows B..2B-1 of the collated batch, built by `DataCollatorForUnpaired`, which shifts further than by one when a
prompt would meet its own completion — adjacent rows of unpaired preference data). Per step:

* policy: a forward with gradients on the B real rows, and — for losses with a KL baseline — a forward WITHOUT
  gradients on the B mismatched rows (z0 is detached, so backpropagating through them would be wasted work and
  activation memory; TRL also runs that pass without gradients);
* reference: one gradient-free forward over all rows (or the precomputed `ref_logps` / `ref_kl_logps`);
* z0 = max(0, mean over the batch — and over processes — of the mismatched pairs' log-ratios), detached;
* the per-example losses of `losses/kto.py` are summed and divided by the number of examples in the whole
  accumulated batch on all processes. TRL takes the mean over each micro-batch's examples (weighted by λ_D / λ_U,
  not renormalised by them) and lets transformers average over accumulation steps: the same whenever micro-batches
  hold equally many examples, and the one-big-batch loss when they do not.

The mismatched pairs depend on which examples share a micro-batch, so z0 (and the kto loss) differs between one
batch of 2B and two accumulated batches of B; apo_zero_unpaired has no z0 and is exactly accumulation-invariant.

Not here: the loss maths (`losses/kto.py`), data preparation (`data/prepare.py`), batching and the mismatched pairs
(`data/collators.py`), reference choice / precompute / sync (`trainers/anchored.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import torch

from posttrain.configs.kto import KTOConfig
from posttrain.data.collators import (
    DataCollatorForUnpaired,
    DataCollatorForUnpairedPreference,
    as_unpaired_rows,
    mismatched_partners,
)
from posttrain.data.prepare import prepare_unpaired_dataset
from posttrain.errors import UserError
from posttrain.losses.kto import KTO_LOSSES, USES_KL_BASELINE, kl_baseline
from posttrain.losses.reduce import global_sum_reduce
from posttrain.models.logprobs import completion_logps
from posttrain.trainers.anchored import ReferenceAnchoredMixin
from posttrain.trainers.base import PostTrainer, note_trl_difference

logger = logging.getLogger(__name__)


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows start..stop-1 of the model inputs, with the columns that are padding in all of them cut off."""
    mask = batch["attention_mask"][start:stop]
    width = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
    return {k: batch[k][start:stop, :width] for k in ("input_ids", "attention_mask", "labels")}


def desirable_balance_warning(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> str | None:
    """The KTO paper's advice (Eq. 8): λ_D·n_D / (λ_U·n_U) in [1, 4/3]. A warning when outside it, else None."""
    desirable = sum(bool(v) for v in labels)
    if desirable in (0, len(labels)):
        which = "desirable (label True)" if desirable else "undesirable (label False)"
        return (f"every one of the {len(labels)} examples is {which}: KTO then only pushes one way, with nothing "
                "to contrast; add examples of the other label (with paired data, give chosen and rejected).")
    n_d, n_u = desirable, len(labels) - desirable
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
        return None
    d_low, u_high = undesirable_weight * n_u / n_d, desirable_weight * n_d / n_u
    return (f"desirable_weight·n_desirable / (undesirable_weight·n_undesirable) = {desirable_weight}·{n_d} / "
            f"({undesirable_weight}·{n_u}) = {ratio:.3g}, outside the KTO paper's recommended [1, 4/3]. Set EITHER "
            f"desirable_weight in [{d_low:.3g}, {d_low * 4 / 3:.3g}] OR undesirable_weight in "
            f"[{u_high * 3 / 4:.3g}, {u_high:.3g}].")


class _TrlLayout:
    """A `DataCollatorForUnpairedPreference` given to KTOTrainer: its batches in the layout compute_loss reads."""

    def __init__(self, collator: DataCollatorForUnpairedPreference, uses_kl: bool):
        self.collator, self.uses_kl = collator, uses_kl

    def __call__(self, examples):
        if self.uses_kl and "KL_completion_ids" not in examples[0]:
            raise UserError("DataCollatorForUnpairedPreference builds KL rows only from a 'KL_completion_ids' column, "
                            "which this dataset lacks; add it, or leave data_collator out (the default collator "
                            "pairs each prompt with another completion of its batch).")
        return as_unpaired_rows(self.collator(examples), self.collator.pad_token_id)


class KTOTrainer(ReferenceAnchoredMixin, PostTrainer):
    """Same call form as TRL's: `KTOTrainer(model, ref_model=None, args=KTOConfig(...), train_dataset=...)`.

    Datasets: unpaired (`prompt`, `completion`, `label`) or paired preference (unpaired automatically), standard or
    conversational.
    """

    config_class = KTOConfig
    method_name = "KTO"
    _tag_names = ["posttrain", "kto"]
    requires_train_dataset = True
    summary_metrics = (("loss", "loss"), ("kl", "kl"), ("rewards/margins", "margin"))
    signature_columns = ["prompt_ids", "completion_ids", "label", "kl_completion_ids", "ref_logps", "ref_kl_logps",
                         "KL_completion_ids", "ref_KL_logps"]  # the last two: TRL's names (its collator's input)
    precompute_input_columns = ("prompt_ids", "completion_ids", "label", "kl_completion_ids")

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **kwargs: Any):
        model_id = model if isinstance(model, str) else None
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config, **kwargs)
        self._signature_columns = list(self.signature_columns)
        if self.args.train_sampling_strategy == "random":
            note_trl_difference("kto_sampling", "KTOTrainer shuffles batches (train_sampling_strategy='random'; TRL's "
                                "KTO default is 'sequential'): the KL baseline's mismatched pairs are built from each "
                                "collated batch, so order does not matter. train_sampling_strategy='sequential' "
                                "reproduces TRL's pairs.")
        if isinstance(self.data_collator, DataCollatorForUnpairedPreference):  # TRL's collator: its keys → ours
            self.data_collator = _TrlLayout(self.data_collator, self.uses_kl)
        self.setup_reference(ref_model, model_id)

    @property
    def uses_kl(self) -> bool:
        return self.args.loss_type in USES_KL_BASELINE

    @property
    def ref_logp_columns(self) -> tuple[str, ...]:
        return ("ref_logps", "ref_kl_logps") if self.uses_kl else ("ref_logps",)

    # ---- data ------------------------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        def prepare(dataset, name):
            return prepare_unpaired_dataset(dataset, tokenizer, args, name, type(self).__name__)

        train_dataset, eval_dataset = self.map_datasets(train_dataset, eval_dataset, prepare)
        if isinstance(train_dataset, datasets.Dataset):
            message = desirable_balance_warning(train_dataset["label"], args.desirable_weight, args.undesirable_weight)
            if message:
                logger.warning(message)
        return train_dataset, eval_dataset

    def default_collator(self, tokenizer, args):
        return DataCollatorForUnpaired(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of,
                                       kl=args.loss_type in USES_KL_BASELINE, max_length=args.max_length)

    def count_loss_items(self, batch):
        return torch.tensor(batch["label"].shape[0])

    # ---- reference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) reference log-probs of the real rows and (B,) of the mismatched rows (None without a KL term)."""
        n = batch["label"].shape[0]
        if "ref_logps" in batch:
            if self.uses_kl and "ref_kl_logps" not in batch:
                raise UserError(f"The data carries precomputed ref_logps but no ref_kl_logps, which loss_type="
                                f"{self.args.loss_type!r} needs; drop the ref_logps column or use "
                                "loss_type='apo_zero_unpaired'.")
            return batch["ref_logps"], batch.get("ref_kl_logps")
        with self.reference.context(model) as ref:
            seq = completion_logps(ref, batch)["logps"].sum(-1)
        return seq[:n], (seq[n:] if self.uses_kl else None)

    def reference_columns(self, batch) -> torch.Tensor:
        ref, ref_kl = self._reference_logps(self.model, batch)
        return torch.stack([ref, ref_kl], -1) if self.uses_kl else ref[:, None]

    def precompute_cache_tag(self) -> str:
        return "kto-" + "-".join(self.ref_logp_columns)

    def _precompute(self, dataset, name: str):
        """Precomputed KL pairs cannot follow the batches, so they are fixed first, by the collator's rule applied
        to consecutive blocks of the batch size (with a sequential sampler: the pairs a live reference would see;
        TRL's rotation). The sampler may still shuffle: every pair stays mismatched; only the property that a
        batch's mismatched completions are its own completions is lost."""
        if (self.uses_kl and isinstance(dataset, datasets.Dataset) and "ref_logps" not in dataset.column_names
                and "kl_completion_ids" not in dataset.column_names):
            block = self.args.per_device_train_batch_size if name == "train" else self.args.per_device_eval_batch_size
            prompts, completions = dataset["prompt_ids"], dataset["completion_ids"]
            partners = []
            for start in range(0, len(completions), block):
                partners += [start + j for j in mismatched_partners(prompts[start:start + block])]
            dataset = dataset.add_column("kl_completion_ids", [completions[j] for j in partners])
        return super()._precompute(dataset, name)

    # ---- loss ------------------------------------------------------------------------------------------------
    def _kl_baseline(self, model, inputs, ref_kl: torch.Tensor) -> torch.Tensor:
        n = inputs["label"].shape[0]
        with torch.no_grad():
            policy_kl = completion_logps(model, _rows(inputs, n, 2 * n))["logps"].sum(-1)
        if self.args.world_size > 1:  # TRL: average the per-process means, then clamp at 0
            local = (policy_kl - ref_kl.to(policy_kl.dtype)).mean().reshape(1)
            means = self.accelerator.gather(local)
            return kl_baseline(means, torch.zeros_like(means))
        return kl_baseline(policy_kl, ref_kl.to(policy_kl.dtype))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        labels = inputs["label"].bool()
        n = labels.shape[0]
        out = completion_logps(model, _rows(inputs, 0, n), with_entropy=True, with_metrics=True)
        policy = out["logps"].sum(-1)
        ref, ref_kl = self._reference_logps(model, inputs)
        kl = self._kl_baseline(model, inputs, ref_kl) if self.uses_kl else policy.new_zeros(())
        per_example, metrics = KTO_LOSSES[args.loss_type](
            policy_logps=policy, ref_logps=ref.to(policy.dtype), labels=labels, kl=kl, beta=args.beta,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
        if num_items_in_batch is None:
            loss = per_example.mean()
        else:
            loss = global_sum_reduce(per_example, num_items_in_batch, self.accelerator.num_processes)
        self._record(out, labels, metrics, inputs)
        return (loss, {}) if return_outputs else loss

    @torch.no_grad()
    def _record(self, out: dict[str, torch.Tensor], labels: torch.Tensor, metrics: dict[str, torch.Tensor],
                inputs) -> None:
        """TRL's KTO metrics: kl per micro-batch; rewards/logps per desirable or undesirable example; margins per
        micro-batch holding both; logits/entropy per completion token; num_tokens over the real rows."""
        self.record_metrics({"kl": metrics["kl"]})
        means = {}
        for side in ("chosen", "rejected"):
            count = float(metrics[f"count/{side}"])
            if count:
                means[side] = float(metrics[f"rewards/{side}_sum"]) / count
                self.record_metrics({f"rewards/{side}": means[side],
                                     f"logps/{side}": float(metrics[f"logps/{side}_sum"]) / count}, weight=count)
        if len(means) == 2:
            self.record_metrics({"rewards/margins": means["chosen"] - means["rejected"]})
        rows = out["mask"].nonzero(as_tuple=True)[0]  # row of each trained token, in the order of out["targets"]
        desirable = labels[rows]
        for key, select in (("logits/chosen", desirable), ("logits/rejected", ~desirable)):
            if select.any():
                self.record_metrics({key: out["logits_mean"][select].mean()}, weight=float(select.sum()))
        if len(rows):
            entropy = out["entropy"].mean()
            self.record_metrics({"entropy": entropy}, weight=float(len(rows)))
        if self.model.training:
            self.add_tokens_seen(inputs["attention_mask"][: labels.shape[0]].sum())
