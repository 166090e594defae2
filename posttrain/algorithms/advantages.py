"""Advantage estimators and their helpers: group-relative (GRPO, Dr. GRPO, GDPO), leave-one-out (RLOO), GAE and
masked whitening (PPO), and the KL-coefficient controllers of PPO-style RLHF.

Conventions: rewards are gathered over the whole generation batch (all processes) before they get here, and the
N rows are grouped consecutively in groups of G = num_generations (rows 0..G−1 share a prompt, and so on).
A NaN reward marks an unscorable completion (every reward function returned None or NaN): it is excluded from every
statistic and receives advantage 0. Standard deviations are *unbiased* (Bessel's correction, as `torch.std` and
TRL's `nanstd`); a set with fewer than two scorable values has std 0 (TRL's nanstd gives NaN there, which ends
as advantage 0 after its `nan_to_num` — the advantages agree, only the logged std differs).

Not here: reward computation and weighting (`rewards/`), the per-token losses (`losses/policy.py`, `losses/value.py`).
"""

from __future__ import annotations

import torch

from posttrain.errors import UserError

Tensor = torch.Tensor
SCALE_REWARDS = ("group", "batch", "none")


def nan_mean_std(x: Tensor, dim: int | None = None, keepdim: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """NaN-aware (mean, unbiased std, count of non-NaN) over `dim` (all elements when None).
    mean is 0 where nothing is scorable; std is 0 where fewer than two values are scorable."""
    valid = ~torch.isnan(x)
    zeros = torch.zeros_like(x)
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    count = valid.sum(dims, keepdim=True).to(x.dtype)
    mean = torch.where(valid, x, zeros).sum(dims, keepdim=True) / count.clamp(min=1)
    square = torch.where(valid, (x - mean) ** 2, zeros).sum(dims, keepdim=True)
    std = torch.where(count > 1, (square / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count))
    if not keepdim:
        mean, std, count = (t.squeeze(dims) if dim is not None else t.reshape(()) for t in (mean, std, count))
    return mean, std, count


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise UserError(f"{rewards.shape[0]} rewards cannot be split into groups of num_generations="
                        f"{num_generations}.")
    return rewards.view(-1, num_generations, *rewards.shape[1:])


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group",
                     eps: float = 1e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-relative advantages (GRPO: Shao et al. 2024, "DeepSeekMath", §4.1.2 outcome supervision):
    A_i = (R_i − mean_g(R)) / (s + eps), where g is i's group and
    s = std_g(R) for "group" (the paper), the std over the whole batch for "batch" (PPO-Lite: Liu et al. 2025,
    "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"), and no division at all for "none" (Dr. GRPO: Liu et
    al. 2025, "Understanding R1-Zero-Like Training", §3.1: dividing by the group std over-weights questions that
    are nearly always or nearly never solved).

    NaN rewards are left out of the group mean and std and get advantage 0. `scale_rewards` True/False are the
    older TRL spellings of "group"/"none".

    Args: rewards (N,), N divisible by num_generations G. Returns: advantages (N,), metrics {"reward": mean
    scorable reward, "reward_std": mean of the group stds, "frac_reward_zero_std": fraction of groups whose std
    is 0 (a group with < 2 scorable rewards counts as zero-std: it carries no signal)}.
    Deviation from TRL: TRL logs `reward_std` as the std over the whole batch and counts zero-std rows, not groups
    (equal for equal-size groups); the advantages are identical.
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale_rewards not in SCALE_REWARDS:
        raise UserError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
    grouped = _grouped(rewards, num_generations)
    mean, group_std, _ = nan_mean_std(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (nan_mean_std(rewards)[1] + eps)
    advantages = torch.nan_to_num(advantages.reshape(-1), nan=0.0)
    group_std = group_std.reshape(-1)
    metrics = {"reward": nan_mean_std(rewards)[0].detach(), "reward_std": group_std.mean().detach(),
               "frac_reward_zero_std": (group_std == 0).to(rewards.dtype).mean().detach()}
    return advantages, metrics


def normalize_then_sum(rewards: Tensor, weights: Tensor, num_generations: int, eps: float = 1e-4) -> Tensor:
    """GDPO multi-reward aggregation ("normalize_then_sum"; "GDPO: Group reward-Decoupled Normalization Policy
    Optimization for Multi-reward RL Optimization", arXiv 2601.05242): z-score each reward function within its group,
    z_ik = (r_ik − mean_g(r_·k)) / (std_g(r_·k) + eps); weighted sum s_i = Σ_k w_k z_ik skipping NaN entries;
    then A_i = (s_i − mean(s)) / (std(s) + eps) over the whole batch. Normalising per function first stops a
    reward with a large scale from drowning the others.

    Rows whose rewards are all NaN are excluded from the batch statistics and get advantage 0.
    Args: rewards (N, K), weights (K,), N divisible by G. Returns: advantages (N,).
    """
    grouped = _grouped(rewards, num_generations)                       # (N/G, G, K)
    mean, std, _ = nan_mean_std(grouped, dim=1, keepdim=True)
    z = ((grouped - mean) / (std + eps)).reshape_as(rewards)           # NaN stays NaN
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    summed = (z * weights).nansum(dim=1)
    summed = summed.masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))
    batch_mean, batch_std, _ = nan_mean_std(summed)
    return torch.nan_to_num((summed - batch_mean) / (batch_std + eps), nan=0.0)


def rloo_advantages(rewards: Tensor, num_generations: int, normalize: bool = False, eps: float = 1e-4) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, "Back to Basics", Eq. 6): b_i = (Σ_{j∈g} R_j − R_i) / (G_s − 1), A_i = R_i − b_i,
    where the sum and G_s run over the scorable (non-NaN) members of i's group. Equivalently
    A_i = G_s/(G_s − 1) · (R_i − mean_g R). A group with fewer than two scorable members has no baseline: A = 0.

    `normalize` (TRL's `normalize_advantages`): then (A − mean)/(std + eps) over the scorable rows of the batch.
    Args: rewards (N,). Returns: advantages (N,); NaN rewards get 0.
    """
    grouped = _grouped(rewards, num_generations)
    count = (~torch.isnan(grouped)).sum(1, keepdim=True).to(rewards.dtype)
    baseline = (grouped.nansum(1, keepdim=True) - grouped) / (count - 1)   # NaN/inf where count < 2 → zeroed
    advantages = torch.where(count > 1, grouped - baseline, torch.full_like(grouped, float("nan"))).reshape(-1)
    if normalize:
        mean, std, _ = nan_mean_std(advantages)
        advantages = (advantages - mean) / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def whiten(values: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening (PPO advantage normalisation; Engstrom et al. 2020, "Implementation Matters", and the
    "N implementation details of RLHF" recipe): (x − μ)/sqrt(σ² + eps) with μ, σ² the mean and unbiased variance
    over the masked entries; with shift_mean=False the mean is added back (used for rewards: rescale only).

    Args: values (any shape), mask (same shape, 1 = real) or None for all. Returns: same shape, 0 outside the
    mask (PPO zeroes padded advantages anyway). One masked entry: variance 0 (TRL raises instead).
    """
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    count = mask.sum().to(values.dtype)
    mean = torch.where(mask, values, 0.0).sum() / count.clamp(min=1)
    square = torch.where(mask, (values - mean) ** 2, 0.0).sum()
    variance = square / (count - 1) if count > 1 else torch.zeros_like(square)
    out = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE",
    Eq. 16, recursive form): δ_t = r_t + γ·V_{t+1} − V_t, Â_t = δ_t + γλ·Â_{t+1}; returns R_t = Â_t + V_t.

    Computed right to left over the masked positions only: "t+1" is the next masked position, V and Â beyond the
    last one are 0 (the episode ends there), and unmasked positions (padding on either side, or holes such as
    tool-result tokens) are skipped as if absent. TRL's PPO runs the recursion over every column with padded
    rewards/values zeroed, which is the same for right-padded masks.

    Args: rewards, values, mask (B, T); the sequence reward is typically placed on the last real token.
    Returns: advantages (B, T), returns (B, T), both 0 outside the mask; no gradient flows (targets).
    """
    mask = mask.bool()
    rewards, values = rewards.detach(), values.detach()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in range(values.shape[1] - 1, -1, -1):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, current, 0.0)
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, current, next_advantage)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


class FixedKLController:
    """Constant KL coefficient β (`value`); `update` does nothing."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2):
    e = clip(KL/KL_target − 1, −0.2, 0.2), β ← β·(1 + e·n_steps/horizon). With n_steps/horizon = K_β this is the
    paper's β_{t+1} = β_t(1 + K_β e_t); scaling by the number of samples seen keeps the rate independent of batch
    size (as in the authors' code).

    Args: init = β_0, target = KL_target (nats), horizon = samples over which β can change by ~e^{±0.2}.
    """

    def __init__(self, init: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
