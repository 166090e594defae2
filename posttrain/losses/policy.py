"""Policy-gradient losses of the GRPO family (per token, unreduced), their aggregation, the top-entropy token
mask, and RLOO's sequence-level clipped objective.

Every entry of `POLICY_LOSSES` takes the same keyword-only arguments, so `POLICY_LOSSES[loss_type](**terms)`
dispatches without special cases:

* `logps`, `old_logps` (B, T): log πθ(y_t) (with grad) and log π_old(y_t) of the sampled tokens (old = the policy
  that generated them; pass `logps.detach()` when on-policy, giving ratio 1 with the right gradient);
* `advantages` (B,) — one per completion — or (B, T) per token;
* `mask` (B, T): 1 = trained completion token;
* floats `epsilon_low`, `epsilon_high` (None ⇒ epsilon_low, as TRL), `delta`, `sapo_temperature_pos/neg`,
  `vespo_k_pos/neg`, `vespo_lambda_pos/neg`;
* `sampler_ratio` (B, T) or (B, 1) or None: the truncated/masked importance weight π_old/π_sampler of a vLLM rollout
  (`sampler_importance_weights`); only vespo reads it (inside its weight); the trainer multiplies the others' ℓ_t
  by it, as TRL;
* `importance_sampling_level`: "token", or "sequence" (GSPO: Zheng et al. 2025, "Group Sequence Policy
  Optimization", §4.1: one ratio per completion r = exp(mean_t m_t·log r_t), broadcast over its tokens).

Each returns the per-token loss ℓ_t (B, T), 0 outside the mask, and detached scalar metrics (means over this
micro-batch's masked tokens; the trainer gathers them). grpo, bnpo, dr_grpo and dapo share one per-token
objective and differ only in `aggregate`, which applies the loss type's normaliser.

`kl_penalty` is GRPO's KL term (k3, times r_t under `use_bias_correction_kl`); the trainer adds β times it to ℓ_t.
`sampler_importance_weights` (vLLM's sampler vs the trainer's log-probs, TRL's vllm_importance_sampling_*) and
`off_policy_sequence_mask` (DeepSeek-V3.2's off-policy sequence masking) are the corrections applied around ℓ_t.

Not here: the KL estimators (`losses/kl.py`), log-probs and entropies (`models/logprobs.py`), advantages
(`algorithms/advantages.py`), PPO's value loss (`losses/value.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.errors import UserError
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
    raise UserError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}.")


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
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(low | high, mask)}


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
    return _masked(loss, mask), {"cispo_clip_ratio": _masked_mean(clipped, mask)}


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


def vespo_weights(*, log_ratio, advantages, mask, sampler_ratio=None, k_pos=2.0, lambda_pos=3.0, k_neg=3.0,
                  lambda_neg=2.0) -> Tensor:
    """VESPO's sequence weight φ(w) = e^λ · w^k · e^(−λw) (so φ(1) = 1; VESPO, arXiv 2602.10693), detached.

    w = exp(Σ_t m_t log r_t + Σ_t m_t log ρ_t): the *summed* (not length-normalised) sequence log-ratio of πθ to
    π_old, plus, for a vLLM rollout, the log of the sampler correction ρ (`sampler_ratio`, token level). (k, λ) =
    (k_pos, λ_pos) where A ≥ 0 else (k_neg, λ_neg). In log space, with the clamps that keep it finite as TRL:
    per-token log r to [−20, 20], log ρ and log w to [log 1e-8, 20]; λ ≥ 1e-4; a non-finite φ becomes 0.
    Args: log_ratio (B, T), advantages (B, 1) or (B, T), mask (B, T) bool. Returns φ (B, 1) or (B, T) (per-token
    advantages), detached."""
    floor = math.log(1e-8)
    m = mask.to(log_ratio.dtype)
    with torch.no_grad():
        log_w = (log_ratio.detach().clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
        if sampler_ratio is not None:
            log_rho = torch.log(sampler_ratio.detach().to(log_ratio.dtype)).clamp(floor, 20.0)
            log_w = log_w + (log_rho.expand_as(m) * m).sum(-1, keepdim=True)
        log_w = log_w.clamp(floor, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
        lam = torch.where(nonneg, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def vespo(*, logps, old_logps, advantages, mask, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
          vespo_lambda_neg=2.0, sampler_ratio=None, **_) -> tuple[Tensor, Metrics]:
    """VESPO (Variational Sequence-level Soft Policy Optimization, arXiv 2602.10693): instead of a hard clip, a
    smooth asymmetric Gamma-shaped weight of the sequence importance ratio scales a REINFORCE term,
    ℓ_t = −sg(φ(w))·A·log πθ(y_t) (`vespo_weights`: w is the summed sequence ratio, times the vLLM sampler
    correction when given). φ(1) = 1, so on-policy ∂ℓ_t/∂logπ_t = −A, the policy gradient; φ → 0 as w → 0 (w^k) and
    as w → ∞ (e^(−λw)). Always token-level log-probs (the weight is per sequence by construction).
    Returns: ℓ (B, T), {"vespo/phi_seq_mean": mean φ over sequences}."""
    mask = mask.bool()
    adv = advantages.detach().to(logps.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    phi = vespo_weights(log_ratio=logps - old_logps.detach(), advantages=adv, mask=mask, sampler_ratio=sampler_ratio,
                        k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
    loss = -phi * adv * logps
    phi_mean = phi.mean() if phi.shape[-1] == 1 else _masked_mean(phi, mask.to(torch.float32))
    return _masked(loss, mask), {"vespo/phi_seq_mean": phi_mean.detach().float()}


def sampler_importance_weights(*, old_logps, sampler_logps, mask, mode="sequence_mask", clip_min=None,
                               clip_max=3.0) -> Tensor:
    """The correction for sampling with another engine than the one that trains (vLLM vs transformers: kernels and
    precision differ, so π_sampler ≠ π_old even with equal weights), TRL's vllm_importance_sampling_correction.

    d_t = m_t·(log π_old(y_t) − log π_sampler(y_t)) (0 where the sampler gave no log-prob: NaN); ratio ρ = exp(d)
    per token (`token_*` modes, (B, T)) or exp(Σ_t d_t) per sequence (`sequence_*` modes, (B, 1)). `*_truncate`:
    ρ clamped to [clip_min, clip_max] (truncated IS); `*_mask`: ρ set to 0 outside [clip_min, clip_max] (masked IS;
    None = unbounded on that side). The trainer multiplies ℓ_t by ρ (vespo folds it into its weight). Detached.
    Args: old_logps, sampler_logps, mask (B, T). Returns ρ (B, T) or (B, 1)."""
    if mode not in SAMPLER_IS_MODES:
        raise UserError(f"vllm_importance_sampling_mode must be one of {', '.join(SAMPLER_IS_MODES)}, got {mode!r}.")
    with torch.no_grad():
        diff = torch.nan_to_num((old_logps.detach() - sampler_logps.detach().to(old_logps.dtype)) * mask, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("truncate"):
            return ratio.clamp(min=clip_min, max=clip_max)
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def off_policy_sequence_mask(*, logps, sampler_logps, advantages, mask, threshold: float) -> Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556, Eq. 9): drop a completion whose advantage is
    negative AND whose mean per-token KL estimate log π_sampler − log πθ over its trained tokens exceeds δ =
    `threshold` (too stale to learn from a negative signal). `sampler_logps` are the log-probs the completion was
    sampled with (vLLM's when given, else the old policy's); NaN entries count as 0. Returns (B, 1) float, 1 = keep
    (or (B, T) for per-token advantages). Detached."""
    with torch.no_grad():
        m = mask.to(logps.dtype)
        kl = torch.nan_to_num(sampler_logps.detach().to(logps.dtype) - logps.detach(), nan=0.0)
        mean_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        return ((adv >= 0) | (mean_kl <= threshold)).to(logps.dtype)


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
    "luspo": grpo,  # LUSPO: GSPO's clipped objective, each sequence's loss summed over its tokens (`loss_terms`)
    "vespo": vespo,
}

# ---- per-item terms ------------------------------------------------------------------------------------------
# loss_type → the unit its normaliser counts: the trainer divides Σ terms by the step's count of it (`losses/reduce.py`)
LOSS_UNITS = {
    "grpo": "sequence",     # mean_i (Σ_t mℓ / Σ_t m): each sequence weighs the same (GRPO Eq. 3)
    "sapo": "sequence",
    "dr_grpo": "sequence",  # Σ mℓ / (B · max_completion_length) (Dr. GRPO §3.1): constant per-sequence length
    "bnpo": "token",        # Σ mℓ / Σ m (BNPO, Xiao et al. 2025)
    "dapo": "token",        # Σ mℓ / N_tokens (DAPO §3.3, token-level loss)
    "cispo": "token",
    "vespo": "token",       # Σ mℓ / N_tokens, as dapo
    "luspo": "sequence",    # mean_i Σ_t mℓ (LUSPO, arXiv 2602.05261): a sequence weighs in proportion to its length
}
# The types TRL normalises per micro-batch (then averages over accumulation steps): loss_normalization="trl".
TRL_LOCAL_NORMALIZATION = ("grpo", "sapo", "dr_grpo", "bnpo", "luspo")


def loss_terms(per_token: Tensor, mask: Tensor, loss_type: str,
               max_completion_length: int | None = None) -> tuple[Tensor, str]:
    """ℓ (B, T) → (terms, unit): the items whose sum, divided by the count of `unit` items, is the loss.

    * grpo, sapo: terms (B,) = Σ_t mℓ / Σ_t m per sequence; unit "sequence";
    * luspo: terms (B,) = Σ_t mℓ per sequence (not length-normalised); unit "sequence";
    * dr_grpo: terms (B,) = Σ_t mℓ / max_completion_length per sequence; unit "sequence" (Σ / B = Dr. GRPO's
      Σ mℓ / (B · L));
    * bnpo, dapo, cispo, vespo: terms (B, T) = mℓ; unit "token" (one normaliser: the token count).

    Args: per_token, mask (B, T). Which normaliser makes the sum a mean: `losses.reduce.global_sum_reduce`."""
    if loss_type not in LOSS_UNITS:
        raise UserError(f"Unknown loss_type {loss_type!r}; choose from: {', '.join(LOSS_UNITS)}.")
    m = mask.to(per_token.dtype)
    total = per_token * m
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise UserError("loss_type='dr_grpo' needs max_completion_length.")
        return total.sum(-1) / max_completion_length, "sequence"
    if loss_type == "luspo":
        return total.sum(-1), "sequence"
    if LOSS_UNITS[loss_type] == "sequence":
        return total.sum(-1) / m.sum(-1).clamp(min=1), "sequence"
    return total, "token"


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
    loss, metrics = grpo(logps=seq_logps.unsqueeze(-1), old_logps=old_seq_logps.unsqueeze(-1), advantages=advantages,
                         mask=torch.ones_like(seq_logps.unsqueeze(-1), dtype=torch.bool), epsilon_low=epsilon_low,
                         epsilon_high=epsilon_high)  # `grpo` on one "token" per sequence
    return loss.squeeze(-1), metrics
