"""`DPOTrainer`: Direct Preference Optimization (Rafailov et al. 2023) and its loss family.

One forward pass scores chosen and rejected completions together (a 2B batch); the reference log-probs come from a
frozen copy, from the policy with its adapters disabled (PEFT), or from a precomputed cache. The per-pair losses
(`losses/preference.py`, combinable with weights) are summed and divided by the number of pairs in the whole
accumulated batch on all processes.

Not here: loss maths (`losses/preference.py`), data preparation (`data/prepare.py`), reference creation
(`models/reference.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from posttrain.configs.dpo import DPOConfig
from posttrain.losses.preference import DPO_LOSSES, f_divergence_score, ld_sequence_logps, wpo_weights
from posttrain.models import reference
from posttrain.models.builtin import cache_dir
from posttrain.models.logprobs import completion_logps
from posttrain.trainers.preference import PreferenceTrainer

logger = logging.getLogger(__name__)


class DPOTrainer(PreferenceTrainer):
    """Same call form as TRL's: `DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=...)`."""

    config_class = DPOConfig
    method_name = "DPO"
    signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, **kwargs: Any):
        model_id = model if isinstance(model, str) else None
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        args = self.args
        if isinstance(ref_model, str):
            ref_model = reference.freeze(self._load_like_policy(ref_model))
        elif ref_model is None and not reference.is_peft_model(self.model):
            ref_model = reference.create_reference_model(self.model, model_id, args.model_init_kwargs)
        elif ref_model is not None:
            ref_model = reference.freeze(ref_model)
        if ref_model is not None and args.disable_dropout:
            from posttrain.models.loading import disable_dropout

            disable_dropout(ref_model)
        self.ref_model = ref_model.to(args.device) if ref_model is not None else None
        self.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
        if args.precompute_ref_log_probs:
            self._precompute_all()
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ValueError("sync_ref_model needs a separate reference model; it does not work with PEFT "
                                 "adapters (the reference is the base model).")
            self.add_callback(reference.SyncReferenceCallback(self.ref_model, self.model, args.ref_model_sync_steps,
                                                              args.ref_model_mixup_alpha))

    def _load_like_policy(self, model_id: str):
        from posttrain.models.loading import load_pretrained_model

        return load_pretrained_model(model_id, None, **(self.args.model_init_kwargs or {}))

    # ---- log-probs -------------------------------------------------------------------------------------------
    def _sequence_logps(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) summed completion log-probs; LD-DPO down-weights tokens past the shorter completion."""
        logps, mask = out["logps"], out["mask"]
        if self.args.ld_alpha is None:
            return logps.sum(-1)
        half = logps.shape[0] // 2
        chosen, rejected = ld_sequence_logps(logps[:half], mask[:half], logps[half:], mask[half:],
                                             self.args.ld_alpha)
        return torch.cat([chosen, rejected])

    @torch.no_grad()
    def _reference_logps(self, model, batch) -> torch.Tensor:
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(batch["input_ids"].device)
        with reference.reference_context(model, self.ref_model, self.accelerator.unwrap_model) as ref:
            return self._sequence_logps(completion_logps(ref, batch))

    def _precompute_all(self) -> None:
        self.train_dataset = self._precompute(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._precompute(v, f"eval {k}") for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = self._precompute(self.eval_dataset, "eval")
        self.ref_model = None  # nothing else needs it: free the memory

    def _precompute(self, dataset, name: str):
        """Reference log-probs for every pair, once; cached on disk by (data fingerprint, reference weights)."""
        if dataset is None or "ref_chosen_logps" in dataset.column_names:
            return dataset
        source = self.ref_model if self.ref_model is not None else self.model
        key = f"{dataset._fingerprint}-{reference.weights_fingerprint(source)}-{self.args.ld_alpha}"
        path = os.path.join(cache_dir(), "ref_logps", f"{key}.pt")
        if os.path.exists(path):
            values = torch.load(path)
        else:
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            loader = DataLoader(dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]),
                                batch_size=batch_size, collate_fn=self.data_collator)
            chunks = []
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                ref = self._reference_logps(self.model, batch)
                chunks.append(ref.view(2, -1).T.cpu())
            values = torch.cat(chunks)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(values, path + ".tmp")
            os.replace(path + ".tmp", path)
            logger.info("Precomputed reference log-probs for %d %s pairs (cached at %s).", len(values), name, path)
        dataset = dataset.add_column("ref_chosen_logps", values[:, 0].tolist())
        return dataset.add_column("ref_rejected_logps", values[:, 1].tolist())

    # ---- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        out = completion_logps(model, inputs, with_log_sum_p2=args.use_weighting)
        policy = self._sequence_logps(out)
        ref = self._reference_logps(model, inputs)
        half = policy.shape[0] // 2
        lengths = out["mask"].sum(-1).to(policy.dtype)
        chosen_logratios, rejected_logratios = policy[:half] - ref[:half], policy[half:] - ref[half:]
        terms = dict(
            chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
            chosen_scores=f_divergence_score(chosen_logratios, args.f_divergence_type, args.f_alpha_divergence_coef),
            rejected_scores=f_divergence_score(rejected_logratios, args.f_divergence_type,
                                               args.f_alpha_divergence_coef),
            policy_chosen_logps=policy[:half], policy_rejected_logps=policy[half:], ref_chosen_logps=ref[:half],
            ref_rejected_logps=ref[half:], chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
            beta=args.beta, label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau)
        per_pair, extra = 0.0, {}
        for name, weight in zip(args.loss_type, self.loss_weights):
            value, metrics = DPO_LOSSES[name](**terms)
            per_pair = per_pair + weight * value
            extra.update(metrics)
        if args.use_weighting:
            weights = wpo_weights(out["logps"], out["log_sum_p2"], out["mask"])
            per_pair = per_pair * weights[:half] * weights[half:]
        loss = self.reduce_pairs(per_pair, num_items_in_batch)
        # rewards are β·(policy − reference) log-ratios whatever the f-divergence, as TRL logs them
        self.record_pair_metrics(out, policy, args.beta * chosen_logratios.detach(),
                                 args.beta * rejected_logratios.detach(), extra, inputs)
        return (loss, {}) if return_outputs else loss
