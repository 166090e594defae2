"""`GRPOTrainer`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4) and its variants —
loss types grpo, bnpo, dr_grpo, dapo (default), cispo, sapo; sequence-level importance sampling (GSPO); the k3 KL
to a reference when beta > 0 (times the importance ratio under `use_bias_correction_kl`, the default, as TRL);
entropy-based token selection.

Advantages are group-relative: each completion's reward minus its group's mean (optionally ÷ group/batch std).
The per-token objective and its aggregation are pure functions (`losses/policy.py`); this module wires them.

Not here: rollouts and the generation-batch cycle (`trainers/online.py`).
"""

from __future__ import annotations

import torch

from posttrain.algorithms.advantages import group_advantages, normalize_then_sum
from posttrain.configs.grpo import GRPOConfig
from posttrain.losses.policy import POLICY_LOSSES, TRL_LOCAL_NORMALIZATION, entropy_mask, kl_penalty, loss_terms
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer


class GRPOTrainer(OnlineTrainer):
    """Same call form as TRL's: `GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...)`;
    `model` may be a name, training arguments may be passed straight to the trainer (guides do)."""

    config_class = GRPOConfig
    method_name = "GRPO"
    vision_data = "prompt"  # image prompts (trainers/vision.py)
    supports_tools = True

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """Group-relative advantages over the whole generation batch (every process's rows)."""
        args = self.args
        if args.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor(self.reward_runner.weights, dtype=rollout.rewards.dtype,
                                   device=rollout.rewards.device)
            advantages = normalize_then_sum(rollout.group_rewards, weights, args.num_generations)
        else:
            advantages, _ = group_advantages(self.reward_runner.weighted_sum(rollout.group_rewards),
                                             args.num_generations, args.scale_rewards)
        return self.advantage_batches(rollout, advantages)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        need_entropy = args.top_entropy_quantile < 1.0
        logps, out = self.completion_logps(model, inputs, with_entropy=True)
        mask = inputs["completion_mask"].bool()
        old_logps = inputs.get("old_logps", logps.detach())
        per_token, metrics = POLICY_LOSSES[args.loss_type](
            logps=logps, old_logps=old_logps, advantages=inputs["advantages"], mask=mask,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            importance_sampling_level=args.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
        if args.beta > 0:
            kl = kl_penalty(logps=logps, ref_logps=inputs["ref_logps"], old_logps=old_logps, mask=mask,
                            importance_sampling_level=args.importance_sampling_level,
                            bias_correction=args.use_bias_correction_kl)
            per_token = per_token + args.beta * kl
            metrics["kl"] = kl.sum().detach() / mask.sum().clamp(min=1)  # kl_penalty is 0 off the mask
        with torch.no_grad():
            entropies = out["entropy_columns"]
            metrics["entropy"] = (entropies * mask).sum() / mask.sum().clamp(min=1)
        if need_entropy:
            mask = mask & entropy_mask(entropies, mask, args.top_entropy_quantile)
        terms, unit = loss_terms(per_token, mask, args.loss_type, max_completion_length=args.max_completion_length)
        local = args.loss_normalization == "trl" and args.loss_type in TRL_LOCAL_NORMALIZATION
        loss = self.reduce_loss(terms, unit, inputs, local=local)
        self.record_metrics(metrics)
        return (loss, {}) if return_outputs else loss
