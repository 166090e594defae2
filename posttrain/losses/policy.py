"""Policy-gradient losses of the GRPO family (per token, unreduced), their aggregation, the top-entropy token
mask, and RLOO's sequence-level clipped objective.

Every entry of `POLICY_LOSSES` takes the same keyword-only arguments, so `POLICY_LOSSES[loss_type](**terms)`
dispatches without special cases:

* `logps`, `old_logps` (B, T): log πθ(y_t) (with grad) and log π_old(y_t) of the sampled tokens (old = the policy
  that generated them; pass `logps.detach()` when on-policy, giving ratio 1 with the right gradient);
* `advantages` (B,) — one per completion — or (B, T) per token;
* `mask` (B, T): 1 = trained completion token;
* floats `epsilon_low`, `epsilon_high` (None ⇒ epsilon_low, as TRL), `delta`, `sapo_temperature_pos/neg`;
* `importance_sampling_level`: "token", or "sequence" (GSPO: Zheng et al. 2025, "Group Sequence Policy
  Optimization", §4.1: one ratio per completion r = exp(mean_t m_t·log r_t), broadcast over its tokens).

Each returns the per-token loss ℓ_t (B, T), 0 outside the mask, and detached scalar metrics (means over this
micro-batch's masked tokens; the trainer gathers them). grpo, bnpo, dr_grpo and dapo share one per-token
objective and differ only in `aggregate`, which applies the loss type's normaliser.

`kl_penalty` is GRPO's KL term (k3, times r_t under `use_bias_correction_kl`); the trainer adds β times it to ℓ_t.

Not here: the KL estimators (`losses/kl.py`), log-probs and entropies (`models/logprobs.py`), advantages
(`algorithms/advantages.py`), PPO's value loss (`losses/value.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.kl import k3

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    x = x.expand_as(mask).to(torch.float32)
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()


def importance_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """r_t = exp(log πθ − log π_old), (B, T) at level "token"; at level "sequence" (GSPO §4.1) the
    length-normalised sequence ratio exp(Σ_t m_t log r_t / Σ_t m_t), (B, 1)."""
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        mean = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        return torch.exp(mean)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}.")


def _prepare(logps, old_logps, advantages, mask, importance_sampling_level):
    mask = mask.bool()
    ratio = importance_ratio(logps, old_logps.detach(), mask, importance_sampling_level)
    advantages = advantages.detach().to(logps.dtype)
    return ratio, advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages, mask


def _masked(loss: Tensor, mask: Tensor) -> Tensor:
    """Broadcast to (B, T) and zero outside the mask (`where`, not `*`, so inf/NaN on padding cannot leak)."""
    loss = loss.expand(mask.shape)
    return torch.where(mask, loss, torch.zeros_like(loss))


def clip_fractions(ratio: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float,
                   epsilon_high: float) -> Metrics:
    """Fractions of masked tokens where the clip binds: low = r < 1−ε_low with A < 0, high = r > 1+ε_high with
    A > 0 (elsewhere the unclipped branch is the minimum and clipping changes nothing). Sequence-level ratios are
    counted once per token of their sequence (TRL averages those over sequences)."""
    mask = mask.bool()
    m = mask.to(torch.float32)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"clip_ratio/low_mean": _masked_mean(low, m), "clip_ratio/high_mean": _masked_mean(high, m),
            "clip_ratio/region_mean": _masked_mean(low | high, m)}


def grpo(*, logps, old_logps, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, delta=None,
         importance_sampling_level="token", **_) -> tuple[Tensor, Metrics]:
    """PPO-clip surrogate per token (Schulman et al. 2017, Eq. 7; GRPO: Shao et al. 2024, Eq. 3 without the KL):
    ℓ_t = −min(r̃_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A), with r̃_t = min(r_t, δ) when `delta` is set (two-sided
    clipping, INTELLECT-2: bounds the update when A < 0 and r is huge) and r̃_t = r_t otherwise. Asymmetric
    ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025, §3.1). Also registered as bnpo, dr_grpo and dapo,
    which differ only in `aggregate`.

    On-policy (r = 1): ℓ_t = −A and ∂ℓ_t/∂logπ_t = −A. Args: see the module docstring. Returns: ℓ (B, T), clip
    fractions (`clip_fractions`).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio, adv, mask = _prepare(logps, old_logps, advantages, mask, importance_sampling_level)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(unclipped * adv, clipped * adv)
    return _masked(loss, mask), clip_fractions(ratio.detach(), adv, mask, epsilon_low, epsilon_high)


def cispo(*, logps, old_logps, advantages, mask, epsilon_high=None, epsilon_low=0.2,
          importance_sampling_level="token", **_) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax 2025, "MiniMax-M1", §3.1): ℓ_t = −sg(min(r_t, ε_high))·A·log πθ(y_t). The IS weight is
    clipped and detached, so every token keeps a REINFORCE gradient −sg(w)·A·∇logπ (PPO-clip would drop it).
    Only the upper bound is used (the paper's ε_low is unbounded); `epsilon_high` is the cap on r itself, not
    1 + ε (ScaleRL recommends 5; None ⇒ epsilon_low, as TRL, which caps the weight below 1 — set it).

    Returns: ℓ (B, T), {"cispo_clip_ratio": fraction of masked tokens with r > ε_high and A > 0}.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio, adv, mask = _prepare(logps, old_logps, advantages, mask, importance_sampling_level)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    loss = -weight * adv * logps
    clipped = (ratio.detach() > epsilon_high) & (adv > 0)
    return _masked(loss, mask), {"cispo_clip_ratio": _masked_mean(clipped, mask.to(torch.float32))}


def sapo(*, logps, old_logps, advantages, mask, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
         importance_sampling_level="token", **_) -> tuple[Tensor, Metrics]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347): a smooth gate instead of the
    hard clip, ℓ_t = −(4/τ)·σ(τ(r_t − 1))·A with τ = τ_pos if A > 0 else τ_neg (τ_neg > τ_pos damps negative
    updates faster). At r = 1: ℓ = −2A/τ and ∂ℓ/∂logπ = −A, the on-policy gradient of the surrogate; the
    gradient weight 4σ'(τ(r−1)) decays smoothly as r leaves 1. Returns: ℓ (B, T), {}.
    """
    ratio, adv, mask = _prepare(logps, old_logps, advantages, mask, importance_sampling_level)
    tau = torch.where(adv > 0, ratio.new_tensor(sapo_temperature_pos), ratio.new_tensor(sapo_temperature_neg))
    loss = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
    return _masked(loss, mask), {}


def kl_penalty(*, logps, ref_logps, old_logps, mask, importance_sampling_level="token",
               bias_correction=True) -> Tensor:
    """GRPO's per-token KL term, before β: k3(logπθ, logπref) (DeepSeekMath Eq. 4), times the importance ratio r
    (token or sequence level, with its gradient) when `bias_correction` (DeepSeek-V3.2 §3: with samples from π_old,
    r·k3 gives the unbiased reverse-KL gradient; it changes the gradient even at r = 1, where ∂(r·k3)/∂logπ =
    k3 + 1 − e^d with d = logπref − logπθ). Returns (B, T), 0 outside the mask."""
    kl = k3(logps, ref_logps)
    if bias_correction:
        kl = kl * importance_ratio(logps, old_logps.detach(), mask, importance_sampling_level)
    return _masked(kl, mask.bool())


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "grpo": grpo, "bnpo": grpo, "dr_grpo": grpo, "dapo": grpo, "cispo": cispo, "sapo": sapo,
}

# ---- aggregation ---------------------------------------------------------------------------------------------
# loss_type → normaliser. Under gradient accumulation (GA micro-batches per optimizer step) the trainer sums the
# micro-batch losses; the first three normalisers only see their micro-batch, so the trainer divides them by GA.
# That is exact for grpo/sapo/dr_grpo when micro-batches hold equal numbers of sequences (the usual case), but bnpo
# then weighs micro-batches equally whatever their token counts: only approximately the step's token mean.
# "global" divides by the token count of the whole optimizer step: the summed micro-batches are exactly its token
# mean, with no ÷GA.
_AGGREGATION = {
    "grpo": "sequence_mean",        # mean_i (Σ_t mℓ / Σ_t m): each sequence weighs the same      ÷GA
    "sapo": "sequence_mean",
    "bnpo": "local_token_mean",     # Σ mℓ / Σ m over this micro-batch (BNPO, Xiao et al. 2025)   ÷GA
    "dr_grpo": "constant",          # Σ mℓ / (B · max_completion_length) (Dr. GRPO §3.1)          ÷GA
    "dapo": "global_token_mean",    # Σ mℓ · P / N_step (DAPO §3.3, token-level loss)              no ÷GA
    "cispo": "global_token_mean",
}


def needs_ga_division(loss_type: str) -> bool:
    """True when `aggregate(..., loss_type)` is local to a micro-batch and the trainer must divide it by the number
    of gradient-accumulation steps; False for the global-normaliser types (dapo, cispo)."""
    return _AGGREGATION[loss_type] != "global_token_mean"


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, num_items: Tensor | float | None = None,
              max_completion_length: int | None = None, num_processes: int = 1) -> Tensor:
    """Reduce ℓ (B, T) to the scalar a micro-batch contributes, by `loss_type`:

    * grpo, sapo: mean over sequences of per-sequence token means (GRPO Eq. 3; short sequences weigh more per token);
    * bnpo: token mean over the given tokens;
    * dr_grpo: Σ m·ℓ / (B · max_completion_length) (a constant normaliser: no length bias);
    * dapo, cispo: Σ m·ℓ · num_processes / num_items, num_items = active tokens of everything one optimizer step
      trains on (all accumulation micro-batches on all processes). DDP averages gradients over the processes and
      the trainer sums the micro-batches, so the step's loss is exactly its global token mean. num_items=None
      means this micro-batch's count (one process, no accumulation). With steps_per_generation > GA, a
      generation batch spans several optimizer steps: pass its count × GA / steps_per_generation (as TRL does).

    Which ones the trainer must still divide by GA: `needs_ga_division`. Args: per_token, mask (B, T).
    Returns: scalar.
    """
    if loss_type not in _AGGREGATION:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose from: {', '.join(_AGGREGATION)}.")
    m = mask.to(per_token.dtype)
    total = per_token * m
    kind = _AGGREGATION[loss_type]
    if kind == "sequence_mean":
        return (total.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if kind == "local_token_mean":
        return total.sum() / m.sum().clamp(min=1)
    if kind == "constant":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        return total.sum() / (per_token.shape[0] * max_completion_length)
    count = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
    return total.sum() * num_processes / count.clamp(min=1)


def entropy_mask(entropies: Tensor, mask: Tensor, quantile: float, pool: Tensor | None = None) -> Tensor:
    """Top-entropy token selection (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
    Effective RL for LLM Reasoning", §4): keep the masked tokens whose entropy ≥ the (1−ρ)-quantile of the masked
    entropies (ρ = `quantile`, 0.2 in the paper; ρ = 1 keeps every token). The quantile interpolates linearly
    (`torch.quantile`). `pool` (1-D): the entropies to take the quantile over instead — all processes' masked
    entropies, for TRL's global threshold; default this micro-batch's masked entropies.

    Args: entropies, mask (B, T). Returns: bool (B, T), False outside the mask and when nothing is masked.
    """
    mask = mask.bool()
    values = entropies.detach()[mask] if pool is None else pool.detach().reshape(-1)
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values.float(), 1.0 - quantile)
    return (entropies.detach() >= threshold.to(entropies.dtype)) & mask


def rloo_sequence_loss(*, seq_logps, old_seq_logps, advantages, epsilon_low=0.2, epsilon_high=0.2,
                       **_) -> tuple[Tensor, Metrics]:
    """RLOO's sequence-level clipped objective (Ahmadian et al. 2024, with PPO-style clipping as TRL's
    `RLOOTrainer`): ρ_i = exp(ℓθ(y_i) − ℓ_old(y_i)) on summed log-probs, L_i = −min(ρ_i A_i, clip(ρ_i, 1−ε_low,
    1+ε_high) A_i). Args: seq_logps, old_seq_logps, advantages (B,). Returns: L (B,) (the trainer averages over
    sequences, ÷GA), clip fractions over sequences.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(seq_logps - old_seq_logps.detach())
    adv = advantages.detach().to(ratio.dtype)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    return loss, clip_fractions(ratio.detach(), adv, torch.ones_like(adv, dtype=torch.bool), epsilon_low,
                                epsilon_high)
