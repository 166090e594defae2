"""Reward-model losses: scalar rewards of (chosen, rejected) sequences in, per-pair loss out.

Not here: reading the reward off the sequence-classification head (the trainer), the reduction over the
accumulated batch (`losses/reduce.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry pairwise loss (Ouyang et al. 2022, "InstructGPT", Eq. 1; margin as in Touvron et al. 2023,
    "Llama 2", Eq. 2; centering as in Eisenstein et al. 2023, "Helping or Herding?"):
    loss_i = −logσ(r_w,i − r_l,i − m_i) + c·(r_w,i + r_l,i)².

    TRL adds c·mean_i (r_w + r_l)² once to the mean loss; putting c·(r_w + r_l)² into each pair's loss gives the same
    value after the mean, and keeps the result split-invariant under the trainer's global reduction.

    Args: chosen_rewards, rejected_rewards (B,) (a trailing dim of 1 from a num_labels=1 head is dropped);
    margin (B,) or None (0); center_rewards_coefficient c or None (0).
    Returns: loss (B,), metrics {accuracy = mean[r_w > r_l], margin = mean(r_w − r_l), min_reward, mean_reward,
    max_reward over both columns}.
    """
    if chosen_rewards.dim() > 1:
        chosen_rewards, rejected_rewards = chosen_rewards.squeeze(-1), rejected_rewards.squeeze(-1)
    difference = chosen_rewards - rejected_rewards
    logits = difference if margin is None else difference - margin.to(difference)
    loss = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    difference = difference.detach()
    both = torch.cat([chosen_rewards, rejected_rewards]).detach()
    metrics = {
        "accuracy": (difference > 0).to(both.dtype).mean(),
        "margin": difference.mean(),
        "min_reward": both.min(),
        "mean_reward": both.mean(),
        "max_reward": both.max(),
    }
    return loss, metrics
