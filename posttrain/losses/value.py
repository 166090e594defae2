"""PPO's two per-token losses (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"): the clipped value
loss of the critic and the clipped policy surrogate, as the "N implementation details of RLHF with PPO" recipe
(and TRL's PPOTrainer) use them. Both return the unreduced loss (B, T), 0 outside the mask, and detached metrics;
the trainer takes masked means and forms pg + vf_coef·vf.

Not here: GAE, whitening and KL controllers (`algorithms/advantages.py`), the value head (`models/`).
"""

from __future__ import annotations

import torch

from posttrain.losses.policy import Metrics, Tensor, _masked_mean, grpo


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float = 0.2) -> tuple[Tensor, Metrics]:
    """ℓ_t = ½·max((V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)²) (the value clipping of OpenAI's
    PPO baselines; Engstrom et al. 2020, "Implementation Matters", find it rarely helps; TRL keeps it).

    Args: values (B, T) with grad; old_values, returns (B, T) targets from the rollout; mask (B, T); c = clip_range.
    Returns: ℓ (B, T), {"clipfrac": fraction of masked tokens where the clipped term is the larger}.
    """
    mask = mask.bool()
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * torch.max(unclipped_loss, clipped_loss)
    clipfrac = _masked_mean(clipped_loss > unclipped_loss, mask.to(torch.float32))
    return torch.where(mask, loss, torch.zeros_like(loss)), {"clipfrac": clipfrac}


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float = 0.2) -> tuple[Tensor, Metrics]:
    """ℓ_t = max(−A_t·r_t, −A_t·clip(r_t, 1 ± c)) = −min(r_t·A_t, clip(r_t)·A_t) (PPO Eq. 7), which is exactly
    `losses.policy.grpo` with ε_low = ε_high = c and token-level advantages: this is a thin wrapper over it.

    Args: logps, old_logps, advantages, mask (B, T). Returns: ℓ (B, T), {"approxkl": ½·masked mean of
    (logπ − logπ_old)² (the k2 estimator), "clipfrac": fraction of masked tokens where the clipped branch is taken
    (= grpo's clip_ratio/region_mean)}.
    """
    loss, clip = grpo(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask,
                      epsilon_low=clip_range, epsilon_high=clip_range)
    m = mask.to(torch.float32)
    approxkl = 0.5 * (((logps - old_logps).detach() ** 2) * m).sum() / m.sum().clamp(min=1)
    return loss, {"approxkl": approxkl, "clipfrac": clip["clip_ratio/region_mean"]}
