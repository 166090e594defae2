"""`OnlineDPOTrainer`: Online DPO / OAIF (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback", Algorithm 1) — sample two completions per prompt from the current policy, let the reward functions
(or reward models) pick the preferred one, and take a DPO step on that fresh pair.

Per generation batch (the shared cycle of `trainers/online.py`): generate 2 completions per prompt → score them
(weighted sum of the reward functions, minus `missing_eos_penalty` for a completion without EOS) → the higher
score is chosen → reference log-probs → the pairs are shuffled (as pairs) into micro-batches laid out like offline
DPO's, [chosen rows; rejected rows]. The loss is `DPO_LOSSES[loss_type]` — the very function offline DPO uses — on
summed completion log-probs of policy and reference, averaged over the pairs of everything one optimizer step
trains on (all micro-batches, all processes).

Decisions, and where they differ from TRL's OnlineDPOTrainer:
* Tied scores (and pairs where a score is NaN because no reward function applied) carry no preference: they are
  left out of the loss and of its normaliser (TRL makes the first completion "chosen"). `frac_tied_pairs` logs how
  many. All-tied batches give loss 0.
* Log-probs are the model's own (temperature 1), as in TRL's Online DPO: `temperature` only shapes sampling.
* `ipo` is length-normalised, as in offline DPO here and in TRL's DPOTrainer (TRL's Online DPO uses sums).
* Batch sizes count completions (2 per prompt), as in every posttrain online trainer.
* LLM judges (`judge=`) are not supported: use a reward function or reward model.

Not here: generation, scoring and the rollout cycle (`trainers/online.py`), loss maths (`losses/preference.py`),
reference creation and the PEFT adapter-off switch (`models/reference.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.compat import deprecated
from posttrain.configs.online_dpo import OnlineDPOConfig
from posttrain.errors import UserError
from posttrain.losses.preference import DPO_LOSSES
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer, as_list


class OnlineDPOTrainer(OnlineTrainer):
    """Same call form as TRL's: `OnlineDPOTrainer(model, ref_model=None, reward_funcs=..., args=OnlineDPOConfig(...),
    train_dataset=...)`; TRL's older `reward_model=` (and `reward_processing_class=`) still work."""

    config_class = OnlineDPOConfig
    method_name = "OnlineDPO"
    summary_metrics = (("loss", "loss"), ("objective/scores", "score"), ("rewards/margins", "margin"))

    def __init__(self, model, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, reward_processing_classes=None,
                 peft_config=None, **kwargs: Any):
        if kwargs.pop("judge", None) is not None:
            raise UserError("OnlineDPOTrainer does not support judges (judge=...); score completions with "
                            "reward_funcs=... (a function, a built-in reward name or a reward model).")
        reward_model = kwargs.pop("reward_model", None)
        if reward_model is not None:
            deprecated("OnlineDPOTrainer(reward_model=...) is deprecated; use reward_funcs=... (it takes reward "
                       "models too).", stacklevel=3)
            reward_funcs = [reward_model] + as_list(reward_funcs)
            legacy_tokenizer = kwargs.pop("reward_processing_class", None)
            if legacy_tokenizer is not None and reward_processing_classes is None:
                reward_processing_classes = [legacy_tokenizer] + [None] * (len(reward_funcs) - 1)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, peft_config=peft_config,
                         ref_model=ref_model, **kwargs)

    def holds_reference(self) -> bool:
        return True  # β > 0 always: DPO's implicit reward is the log-ratio to the reference

    @property
    def beta(self) -> float:
        """β of the current epoch (a list in the config is a per-epoch schedule)."""
        return self.args.beta_at_epoch(self.state.epoch or 0)

    def rollout_tensors(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The shared batch, its leftmost (prompt) columns cut so that prompt + completion ≤ max_length (TRL's
        Online DPO truncates its log-prob passes the same way); reference and policy see the same columns."""
        batch = super().rollout_tensors(rollout)
        cut = batch["input_ids"].shape[1] - self.args.max_length
        if cut > 0:
            keep = max(batch["input_ids"].shape[1] - batch["completion_mask"].shape[1] - cut, 1)  # one context token
            batch["input_ids"] = batch["input_ids"][:, -(keep + batch["completion_mask"].shape[1]):]
            batch["attention_mask"] = batch["attention_mask"][:, -batch["input_ids"].shape[1]:]
        return batch

    # ---- the rollout hook ----------------------------------------------------------------------------------------
    uses_old_logps = False  # the DPO loss has no importance ratio

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """Rank each pair by its scores (the weighted reward sum, minus `missing_eos_penalty` without EOS), then
        shuffle whole pairs into micro-batches laid out [chosen rows; rejected rows], each with `pair_weight` on its
        chosen rows (1 for a pair that enters the loss, 0 when tied; 0 on rejected rows, so it sums to the pairs)."""
        scores, truncated = rollout.scores, rollout.is_truncated  # truncated: no EOS (the tokenizer's or the config's)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * truncated.to(scores.dtype)
        pairs = scores.view(-1, 2)
        known = ~pairs.isnan().any(-1)
        self.record_metrics({
            "objective/scores": scores.nanmean(),
            "objective/scores_margin": (pairs[known, 0] - pairs[known, 1]).abs().mean() if known.any() else 0.0,
            "val/contain_eos_token": (~truncated).float().mean(),
            "frac_tied_pairs": (~_decided(pairs)).float().mean(),
        })
        rollout.advantages = scores  # the completions table shows the score
        batch = {**self.rollout_tensors(rollout), "scores": scores}
        second_wins = (pairs[:, 1] > pairs[:, 0]).long()
        first = torch.arange(pairs.shape[0], device=scores.device) * 2
        chosen, rejected = first + second_wins, first + 1 - second_wins
        ranked = {**{k: v[torch.stack([chosen, rejected], 1).reshape(-1)] for k, v in batch.items()},
                  "pair_weight": torch.stack([_decided(pairs).float(), torch.zeros_like(scores[0::2])], 1).reshape(-1)}
        return self.cycle([_chosen_first(part) for part in self.split(ranked, group=2)])

    # ---- loss ------------------------------------------------------------------------------------------------
    logps_at_sampling_temperature = False  # DPO's implicit reward compares the model's own (T = 1) distributions

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        beta = self.beta
        logps, _ = self.completion_logps(model, inputs)
        mask = inputs["completion_mask"].to(logps.dtype)
        policy = (logps * mask).sum(-1)  # (2P,) chosen rows first
        ref = (inputs["ref_logps"] * mask).sum(-1)
        lengths = mask.sum(-1)
        half = policy.shape[0] // 2
        chosen_logratios, rejected_logratios = policy[:half] - ref[:half], policy[half:] - ref[half:]
        per_pair, extra = DPO_LOSSES[self.args.loss_type](
            chosen_scores=chosen_logratios, rejected_scores=rejected_logratios,
            chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
            policy_chosen_logps=policy[:half], policy_rejected_logps=policy[half:], ref_chosen_logps=ref[:half],
            ref_rejected_logps=ref[half:], chosen_lengths=lengths[:half], rejected_lengths=lengths[half:], beta=beta)
        weight = inputs["pair_weight"][:half]
        per_pair = torch.where(weight > 0, per_pair * weight, torch.zeros_like(per_pair))
        loss = self.reduce_loss(per_pair, "pair", inputs)
        with torch.no_grad():  # TRL's Online DPO metrics: objective/* over every completion, the rest over ranked pairs
            policy = policy.detach()
            kl = policy - ref  # Σ_t (log π − log π_ref) per completion
            non_score = -beta * kl
            self.record_metrics({"objective/kl": kl.mean(), "objective/entropy": -policy.mean(),
                                 "objective/non_score_reward": non_score.mean(),
                                 "objective/rlhf_reward": (inputs["scores"] + non_score).nanmean(), "beta": beta},
                                weight=policy.shape[0])
            ranked = weight > 0
            if ranked.any():
                chosen, rejected = beta * kl[:half][ranked], beta * kl[half:][ranked]
                self.record_metrics({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                                     "rewards/accuracies": (chosen > rejected).float().mean(),
                                     "rewards/margins": (chosen - rejected).mean(),
                                     "logps/chosen": policy[:half][ranked].mean(),
                                     "logps/rejected": policy[half:][ranked].mean(), **extra},
                                    weight=float(ranked.sum()))
        return (loss, {}) if return_outputs else loss


def _chosen_first(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows laid out (chosen, rejected) per pair → [every chosen row; every rejected row], as offline DPO's."""
    return {k: torch.cat([v[0::2], v[1::2]]) for k, v in part.items()}


def _decided(pairs: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the pair (P, 2) of scores has a preference (different, neither NaN)."""
    return (pairs[:, 0] != pairs[:, 1]) & ~pairs.isnan().any(-1)

