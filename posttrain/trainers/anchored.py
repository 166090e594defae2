"""`ReferenceAnchoredMixin`: what trainers anchored to a frozen reference policy share (DPO, KTO).

Lives here: precomputing reference log-probs once per example (cached on disk by dataset fingerprint and reference
weights, after which the reference model is dropped).

Not here: the reference itself, the one `Reference` every anchored trainer holds (`models/reference.py`); a
trainer's reference log-probs for one batch (its `reference_columns`).
"""

from __future__ import annotations

import logging
import os

import datasets
import torch
from torch.utils.data import DataLoader

from posttrain.errors import UserError
from posttrain.models import reference
from posttrain.models.builtin import cache_dir

logger = logging.getLogger(__name__)


class ReferenceAnchoredMixin:
    """Mixed into a `PostTrainer` subclass; its config carries precompute_ref_log_probs, precompute_ref_batch_size,
    sync_ref_model, ref_model_sync_steps, ref_model_mixup_alpha and disable_dropout."""

    ref_logp_columns: tuple[str, ...] = ()  # per-example columns the precompute adds, as reference_columns orders them
    precompute_input_columns: tuple[str, ...] = ()  # dataset columns the collator needs for that pass

    def holds_reference(self) -> bool:
        return True

    def setup_reference(self, ref_model, model_id: str | None) -> None:
        """Call at the end of __init__: builds `self.reference` (`models/reference.py`), then precomputes reference
        log-probs when asked (after which the reference model is dropped)."""
        self.reference = reference.Reference.build(self, ref_model, model_id)
        self._reference_was_policy_copy = ref_model is None
        if self.args.precompute_ref_log_probs:
            self._refuse_streams()
            self.train_dataset, self.eval_dataset = self.map_datasets(self.train_dataset, self.eval_dataset,
                                                                      self._precompute)
            self.ref_model = None  # nothing else needs it: free the memory

    # ---- hooks -----------------------------------------------------------------------------------------------
    def reference_columns(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, len(ref_logp_columns)) live reference log-probs of one collated batch of B examples."""
        raise NotImplementedError

    def precompute_cache_tag(self) -> str:
        """Whatever else, beside the data and the reference weights, the precomputed values depend on."""
        return ""

    def prepare_eval_dataset(self, eval_dataset):
        """An eval set given to evaluate() late, prepared as usual; with precompute_ref_log_probs its reference
        log-probs are precomputed now when the reference can still be computed: PEFT (adapters off), or before
        the first step when the reference was a copy of the policy (the policy still equals it). After training
        with a dropped reference copy they cannot be, and that is a one-line error."""
        prepared = super().prepare_eval_dataset(eval_dataset)
        if not self.args.precompute_ref_log_probs:
            return prepared
        if self.reference.model is not None or self.reference_is_base_model():
            return self.map_datasets(None, prepared, self._precompute)[1]
        if self.state.global_step == 0 and self._reference_was_policy_copy:
            self.reference.model = self.model  # untrained: the policy is the reference
            try:
                return self.map_datasets(None, prepared, self._precompute)[1]
            finally:
                self.reference.model = None
        for dataset in (prepared.values() if isinstance(prepared, dict) else [prepared]):
            if self.ref_logp_columns[0] not in (dataset.column_names or []):
                raise UserError("Cannot compute reference log-probs for a dataset passed to evaluate() after training: "
                                "precompute_ref_log_probs=True dropped the reference copy and the policy has moved. "
                                "Give the dataset to the trainer as eval_dataset=... (precomputed with the train set), "
                                "or set precompute_ref_log_probs=False.")
        return prepared

    def reference_is_base_model(self) -> bool:
        """Whether the reference is the PEFT policy with its adapters off (then it can still be computed)."""
        from posttrain.models.adapters import is_peft_model

        return is_peft_model(self.model)

    # ---- precompute ------------------------------------------------------------------------------------------
    def _refuse_streams(self) -> None:
        for name, dataset in (("train", self.train_dataset), *_named(self.eval_dataset)):
            if dataset is not None and not isinstance(dataset, datasets.Dataset):
                raise UserError(f"precompute_ref_log_probs=True is not supported with IterableDataset (the {name} "
                                "dataset is streamed): the values are stored per example, which needs random "
                                "access. Set precompute_ref_log_probs=False, or give a map-style dataset.")

    def _precompute(self, dataset, name: str):
        """Reference log-probs for every example, once; cached on disk by (data fingerprint, reference weights)."""
        if dataset is None:
            return dataset
        if not isinstance(dataset, datasets.Dataset):
            raise UserError(f"precompute_ref_log_probs=True is not supported with IterableDataset (the {name} dataset "
                            "is streamed); set precompute_ref_log_probs=False, or give a map-style dataset.")
        if self.ref_logp_columns[0] in dataset.column_names:
            return dataset
        source = self.ref_model if self.ref_model is not None else self.model
        key = f"{dataset._fingerprint}-{reference.weights_fingerprint(source)}-{self.precompute_cache_tag()}"
        path = os.path.join(cache_dir(), "ref_logps", f"{key}.pt")
        if os.path.exists(path):
            values = torch.load(path)
        else:
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            # the images too: the reference must see them (trainers/vision.py)
            inputs = [c for c in (*self.precompute_input_columns, "images") if c in dataset.column_names]
            loader = DataLoader(dataset.select_columns(inputs), batch_size=batch_size, collate_fn=self.data_collator)
            chunks = []
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                chunks.append(self.reference_columns(batch).cpu())
            values = torch.cat(chunks)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(values, path + ".tmp")
            os.replace(path + ".tmp", path)
            logger.info("Precomputed reference log-probs for %d %s examples (cached at %s).", len(values), name, path)
        for i, column in enumerate(self.ref_logp_columns):
            dataset = dataset.add_column(column, values[:, i].tolist())
        return dataset


def _named(eval_dataset) -> list[tuple[str, object]]:
    if isinstance(eval_dataset, dict):
        return [(f"eval {k}", v) for k, v in eval_dataset.items()]
    return [("eval", eval_dataset)]
