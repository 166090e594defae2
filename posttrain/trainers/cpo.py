"""`CPOTrainer` (CPO, SimPO, AlphaPO) and `ORPOTrainer`: preference optimisation without a reference model.

Both add a negative log-likelihood on the chosen completions to a pairwise term computed from the policy's own
log-probs: CPO/SimPO/AlphaPO weight it by `cpo_alpha`; ORPO (Hong et al. 2024, Eq. 6) adds it with weight 1 and
scales the odds-ratio term by β. The NLL is a token mean over chosen completion tokens. Deviation from TRL:
TRL's ORPO takes that NLL over prompt + chosen (every attended token); the ORPO paper (Eq. 6, L_SFT) and we take
it over the chosen completion only, as for CPO.

Not here: the loss maths (`losses/reference_free.py`), shared pair handling (`trainers/preference.py`).
"""

from __future__ import annotations

import torch

from posttrain.configs.cpo import CPOConfig, ORPOConfig
from posttrain.errors import UserTypeError
from posttrain.losses.preference import sft as chosen_nll
from posttrain.losses.reference_free import CPO_LOSSES, orpo
from posttrain.models.logprobs import completion_logps
from posttrain.trainers.preference import PreferenceTrainer, log_eval_generations


class _ReferenceFreeTrainer(PreferenceTrainer):
    """Shared forward: summed completion log-probs and lengths of chosen (rows :B) and rejected (rows B:)."""

    def __init__(self, model=None, *args, model_init=None, **kwargs):
        # TRL's ORPO/CPO pass model_init to transformers' Trainer: a function that builds the model, given instead
        # of one. Here it is called once, then the model is prepared as a given one is (PEFT, dropout…); transformers'
        # re-creation at each train() call (hyperparameter_search) would skip that preparation, so it is not kept.
        if model_init is not None:
            if model is not None:
                raise UserTypeError(f"{type(self).__name__} takes a model or a model_init, not both (as transformers' "
                                    "Trainer); drop one.")
            model = model_init()
        super().__init__(model, *args, **kwargs)

    def evaluation_loop(self, dataloader, *args, **kwargs):
        if self.args.generate_during_eval:
            log_eval_generations(self, dataloader.dataset)
        return super().evaluation_loop(dataloader, *args, **kwargs)

    def pair_loss(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """(per-pair preference loss, metrics, weight of the chosen NLL)."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        out = completion_logps(model, inputs, with_metrics=True)
        policy = out["logps"].sum(-1)
        lengths = out["mask"].sum(-1).to(policy.dtype)
        half = policy.shape[0] // 2
        terms = dict(policy_chosen_logps=policy[:half], policy_rejected_logps=policy[half:],
                     chosen_lengths=lengths[:half], rejected_lengths=lengths[half:])
        per_pair, extra, nll_weight = self.pair_loss(terms)
        nll, nll_metrics = chosen_nll(**terms, chosen_length_mean=inputs.get("chosen_length_mean"))
        if nll_weight:
            per_pair = per_pair + nll_weight * nll
        loss = self.reduce_pairs(per_pair, num_items_in_batch)
        self.record_pair_metrics(out, policy, None, None, {**extra, **nll_metrics}, inputs)
        return (loss, {}) if return_outputs else loss


class CPOTrainer(_ReferenceFreeTrainer):
    """Same call form as TRL's: `CPOTrainer(model, args=CPOConfig(...), train_dataset=...)`."""

    config_class = CPOConfig
    method_name = "CPO"
    _tag_names = ["posttrain", "cpo"]

    def pair_loss(self, terms):
        args = self.args
        loss, metrics = CPO_LOSSES[args.loss_type](**terms, beta=args.beta, label_smoothing=args.label_smoothing,
                                                   simpo_gamma=args.simpo_gamma, alpha=args.alpha)
        return loss, metrics, args.cpo_alpha


class ORPOTrainer(_ReferenceFreeTrainer):
    """Same call form as TRL's: `ORPOTrainer(model, args=ORPOConfig(...), train_dataset=...)`."""

    config_class = ORPOConfig
    method_name = "ORPO"
    _tag_names = ["posttrain", "orpo"]

    def pair_loss(self, terms):
        beta = self.args.beta
        loss, metrics = orpo(**terms, beta=beta)
        with torch.no_grad():  # TRL's ORPO rewards: β × per-token average log-prob
            chosen = beta * terms["policy_chosen_logps"] / terms["chosen_lengths"]
            rejected = beta * terms["policy_rejected_logps"] / terms["rejected_lengths"]
        metrics.update({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                        "rewards/accuracies": (chosen > rejected).float().mean(),
                        "rewards/margins": (chosen - rejected).mean()})
        return loss, metrics, 1.0
