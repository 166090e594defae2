"""Per-token Monte-Carlo estimators of KL(πθ ‖ πref) from the log-probabilities of sampled tokens
(J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html).

With x ~ πθ and d = log πref(x) − log πθ(x) (so the ratio ρ = πref/πθ = e^d):
  k1 = −d              unbiased, high variance, can be negative per token;
  k2 = d²/2            biased (low bias near πθ = πref), always ≥ 0;
  k3 = (e^d − 1) − d   unbiased (E[e^d] = 1) and always ≥ 0 since e^d ≥ 1 + d; GRPO's penalty.
Each takes logps, ref_logps (B, T) and returns the per-token estimate (B, T), unmasked and unreduced: the caller
masks, adds it to the loss (GRPO, `β·k3`) or sums it into the reward (RLOO/PPO, `−β·Σ_t k1`).

Not here: the reference forward pass (`models/reference.py`), the choice of β (`algorithms/advantages.py` holds
the KL controllers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log πθ − log πref (Schulman 2020, the naive estimator). Args/returns (B, T)."""
    return logps - ref_logps


def k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = ½(log πθ − log πref)² (Schulman 2020; an f-divergence whose second order matches KL). (B, T)."""
    return 0.5 * (logps - ref_logps) ** 2


def k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1 (Schulman 2020; DeepSeekMath Eq. 4). Args/returns (B, T); ≥ 0,
    = 0 exactly where logps == ref_logps. Gradient w.r.t. logps: 1 − exp(ref − logp)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": k1, "k2": k2, "k3": k3}
