"""Unpaired preference losses (KTO family): one completion per example with a desirable/undesirable label.

Every loss takes the same keyword-only arguments — `policy_logps`, `ref_logps` (B,) summed completion log-probs,
`labels` (B,) bool (True = desirable), `kl` the detached baseline z0, `beta`, `desirable_weight`,
`undesirable_weight` — and returns the weighted per-example loss (B,) plus detached metrics. The trainer sums and
divides by the number of examples, which is TRL's mean over the concatenated [desirable; undesirable] losses.

Metrics are sums and counts ("rewards/chosen_sum", "count/chosen", …) rather than means, because a micro-batch may
hold no desirable (or no undesirable) example; the trainer divides the accumulated sums by the accumulated counts.

Not here: building the mismatched (x_i, y_{i−1}) pairs for the KL estimate (data preparation), averaging z0 across
processes (the trainer), the forward passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


@torch.no_grad()
def kl_baseline(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO reference point (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    Eq. 8 estimate): z0 = max(0, mean_i [ℓθ(y'_i|x_i) − ℓref(y'_i|x_i)]) over mismatched pairs (x_i, y'_i), detached.
    The paper estimates the KL term from such pairs in the micro-batch; TRL (and we) additionally average it over
    processes in the trainer.

    Args: policy_kl_logps, ref_kl_logps (B,) summed log-probs of the mismatched completions. Returns: z0, 0-dim.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0.0)


def _metrics(policy_logps: Tensor, logratios: Tensor, labels: Tensor, kl, beta: float) -> Metrics:
    rewards = (beta * logratios).detach()
    policy_logps = policy_logps.detach()
    labels = labels.bool()
    zero = rewards.new_zeros(())
    return {
        "rewards/chosen_sum": torch.where(labels, rewards, zero).sum(),
        "rewards/rejected_sum": torch.where(labels, zero, rewards).sum(),
        "logps/chosen_sum": torch.where(labels, policy_logps, zero).sum(),
        "logps/rejected_sum": torch.where(labels, zero, policy_logps).sum(),
        "count/chosen": labels.sum().to(rewards.dtype),
        "count/rejected": (~labels).sum().to(rewards.dtype),
        "kl": torch.as_tensor(kl, dtype=rewards.dtype, device=rewards.device).detach(),
    }


def kto(*, policy_logps, ref_logps, labels, kl, beta, desirable_weight=1.0, undesirable_weight=1.0,
        **_) -> tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, Eq. 7 with v(x, y) inside λ_y − v): with Δ = ℓθ − ℓref and reference point z0,
    desirable λ_D·(1 − σ(β(Δ − z0))), undesirable λ_U·(1 − σ(β(z0 − Δ))). The paper writes λ_y − λ_y·σ(…); that is
    the same. z0 carries no gradient (it is `kl_baseline`'s output).

    Args: policy_logps, ref_logps (B,); labels (B,) bool; kl float or 0-dim tensor; beta, weights floats.
    Returns: loss (B,), metrics (sums/counts, kl).
    """
    labels = labels.bool()
    logratios = policy_logps - ref_logps
    kl_t = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl_t)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl_t - logratios)))
    return torch.where(labels, desirable, undesirable), _metrics(policy_logps, logratios, labels, kl, beta)


def apo_zero_unpaired(*, policy_logps, ref_logps, labels, kl=0.0, beta, desirable_weight=1.0, undesirable_weight=1.0,
                      **_) -> tuple[Tensor, Metrics]:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 6 split per example):
    desirable λ_D·(1 − σ(βΔ)), undesirable λ_U·σ(βΔ). Needs no KL pass; `kl` is accepted for a uniform signature,
    unused by the loss, and reported as given.

    Args/Returns: as `kto`.
    """
    labels = labels.bool()
    logratios = policy_logps - ref_logps
    prob = torch.sigmoid(beta * logratios)
    loss = torch.where(labels, desirable_weight * (1.0 - prob), undesirable_weight * prob)
    return loss, _metrics(policy_logps, logratios, labels, kl, beta)


KTO_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "kto": kto,
    "apo_zero_unpaired": apo_zero_unpaired,
}

# Losses that measure the log-ratio against the KL baseline z0, and so need the mismatched (x_i, y'_i) passes.
USES_KL_BASELINE = frozenset({"kto"})
