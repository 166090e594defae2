"""`DPOTrainer`: Direct Preference Optimization (Rafailov et al. 2023) and its loss family.

One forward pass scores chosen and rejected completions together (a 2B batch); the reference log-probs come from a
frozen copy, from the policy with its adapters disabled (PEFT), or from a precomputed cache. The per-pair losses
(`losses/preference.py`, combinable with weights) are summed and divided by the number of pairs in the whole
accumulated batch on all processes.

Not here: loss maths (`losses/preference.py`), data preparation (`data/prepare.py`), reference creation
(`models/reference.py`), reference choice, precompute cache and TR-DPO sync (`trainers/anchored.py`, shared with
KTO).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.configs.dpo import DPOConfig
from posttrain.data.collators import DataCollatorForPreference  # noqa: F401  (TRL's import path)
from posttrain.losses.preference import DPO_LOSSES, f_divergence_score, ld_sequence_logps, wpo_weights
from posttrain.models.logprobs import completion_logps
from posttrain.trainers.anchored import ReferenceAnchoredMixin
from posttrain.trainers.preference import PreferenceTrainer

# A pair's chosen and rejected rows begin with the same prompt: the columns before the batch's first completion
# token run once per pair (`models/shared_prefix.py`; right-padded rows share up to the shortest prompt).
_SHARED = 1 << 30


class DPOTrainer(ReferenceAnchoredMixin, PreferenceTrainer):
    """Same call form as TRL's: `DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=...)`."""

    config_class = DPOConfig
    method_name = "DPO"
    _tag_names = ["posttrain", "dpo"]
    signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
    ref_logp_columns = ("ref_chosen_logps", "ref_rejected_logps")
    precompute_input_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **kwargs: Any):
        model_id = model if isinstance(model, str) else None
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config, **kwargs)
        self.loss_weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        self.setup_reference(ref_model, model_id)

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
        with self.reference.context(model) as ref:
            pack = self.args.padding_free is not False
            return self._sequence_logps(completion_logps(ref, batch, shared_prefix=_SHARED, pack_rows=pack))

    def reference_columns(self, batch) -> torch.Tensor:
        return self._reference_logps(self.model, batch).view(2, -1).T  # (2B,) chosen then rejected → (B, 2)

    def precompute_cache_tag(self) -> str:
        return f"{self.args.ld_alpha}"

    # ---- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        out = completion_logps(model, inputs, with_log_sum_p2=args.use_weighting, with_metrics=True,
                               shared_prefix=_SHARED, pack_rows=args.padding_free is not False)
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
            beta=args.beta, label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
            chosen_length_mean=inputs.get("chosen_length_mean"))
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
