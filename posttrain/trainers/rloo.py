"""`RLOOTrainer`: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

Reward R_i = Σ_k w_k r_ik (optionally clamped), minus β·Σ_t (log π_old − log π_ref) — the k1 KL estimate folded into
the reward; advantage A_i = R_i − mean of the other completions of the same prompt; loss the sequence-level clipped
objective on summed log-probs (as TRL's RLOOTrainer), averaged over sequences.

Not here: the rollout cycle (`trainers/online.py`), maths (`algorithms/advantages.py`, `losses/policy.py`).
"""

from __future__ import annotations

import torch

from posttrain.algorithms.advantages import rloo_advantages
from posttrain.configs.rloo import RLOOConfig
from posttrain.losses.kl import k1
from posttrain.losses.policy import rloo_sequence_loss
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer


class RLOOTrainer(OnlineTrainer):
    """Same call form as TRL's: `RLOOTrainer(model, reward_funcs, args=RLOOConfig(...), train_dataset=...)`."""

    config_class = RLOOConfig
    method_name = "RLOO"
    vision_data = "prompt"  # image prompts (trainers/vision.py)
    supports_tools = True
    uses_old_logps = True  # the KL term of the reward and the ratio both use the sampling policy's log-probs

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """R = clamp(Σ_k w_k r_k) − β·Σ_t (log π_old − log π_ref) per completion, gathered over every process;
        leave-one-out advantages."""
        args = self.args
        total = rollout.scores
        if args.reward_clip_range is not None:
            total = total.clamp(*args.reward_clip_range)
        if args.beta > 0:
            mask = rollout.loss_mask
            kl = (k1(rollout.old_logps, rollout.ref_logps) * mask).sum(-1)
            total = total - args.beta * kl
            self.record_metrics({"kl": (kl.sum() / mask.sum().clamp(min=1)).detach()})
        advantages = rloo_advantages(self.gather_rows(total), self.num_generations, normalize=args.normalize_advantages)
        return self.advantage_batches(rollout, advantages)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        logps, _ = self.completion_logps(model, inputs)
        mask = inputs["completion_mask"].to(logps.dtype)
        seq_logps = (logps * mask).sum(-1)
        old_seq_logps = (inputs["old_logps"] * mask).sum(-1)
        per_sequence, metrics = rloo_sequence_loss(seq_logps=seq_logps, old_seq_logps=old_seq_logps,
                                                   advantages=inputs["advantages"], epsilon_low=args.epsilon,
                                                   epsilon_high=args.epsilon_high)
        loss = self.reduce_loss(per_sequence, "sequence", inputs)
        self.record_metrics(metrics)
        return (loss, {}) if return_outputs else loss
