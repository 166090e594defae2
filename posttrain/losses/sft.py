"""Supervised fine-tuning losses over the log-probabilities of target tokens.

Each function takes `logps` (N,) — log pi_theta(y_t | y_<t) of the N trained target tokens, already selected by
the completion mask — and returns the unreduced per-token loss (N,) plus a dict of detached metrics. The trainer
sums and divides by the global number of target tokens of the accumulated batch (`losses/reduce.py`), so the loss
does not depend on how a batch is split across devices or accumulation steps.

Not here: the forward pass and the choice of which positions carry a loss (`models/logprobs.py`, data masks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def nll_loss(logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood (token cross-entropy): loss_t = -log p_t.

    Args: logps (N,). Returns: loss (N,), metrics {}.
    """
    return -logps, {}


def dft_loss(logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective
    with Reward Rectification", Eq. 8): loss_t = -sg(p_t) * log p_t, i.e. cross-entropy re-weighted by the
    stop-gradient probability of the target token. Gradient: -p_t * d log p_t.

    Args: logps (N,). Returns: loss (N,), metrics {"dft_weight": mean sg(p_t)}.
    """
    weight = logps.detach().exp()
    return -weight * logps, {"dft_weight": weight.mean()}


SFT_LOSSES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "nll": nll_loss,
    "dft": dft_loss,
}
