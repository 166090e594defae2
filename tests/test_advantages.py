"""Advantage estimators: group-relative (group/batch/none scaling, NaN rewards, zero-std groups), GDPO's
normalize_then_sum, RLOO, masked whitening, GAE (hand values and a naive double loop) and the KL controllers.
Expected numbers are derived by hand in the comments and written out with math.*, never by calling the code twice."""

import math

import pytest
import torch

from posttrain.algorithms.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    normalize_then_sum,
    rloo_advantages,
    whiten,
)

EPS = 1e-4
NAN = float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# Standard rewards, G = 3: group 1 = (1, 2, 3): mean 2, unbiased std sqrt((1 + 0 + 1)/2) = 1;
# group 2 = (5, 5, 5): mean 5, std 0.
REWARDS = t(1, 2, 3, 5, 5, 5)


def test_group_scaling_divides_by_group_std():
    # A = (R − group mean)/(group std + eps): (−1, 0, 1)/(1 + eps) and (0, 0, 0)/(0 + eps) = 0.
    adv, metrics = group_advantages(REWARDS, 3, "group")
    a = 1 / (1 + EPS)
    close(adv, [-a, 0, a, 0, 0, 0])
    close(metrics["reward"], 21 / 6)               # (6 + 15)/6
    close(metrics["reward_std"], 0.5)              # mean of group stds (1, 0)
    close(metrics["frac_reward_zero_std"], 0.5)    # group 2 only


def test_batch_scaling_divides_by_batch_std():
    # Batch mean 3.5; deviations −2.5, −1.5, −0.5, 1.5, 1.5, 1.5 → squares sum 6.25 + 2.25 + 0.25 + 3·2.25 = 15.5;
    # unbiased variance 15.5/5 = 3.1. Numerators stay R − GROUP mean: (−1, 0, 1, 0, 0, 0).
    adv, _ = group_advantages(REWARDS, 3, "batch")
    s = math.sqrt(3.1) + EPS
    close(adv, [-1 / s, 0, 1 / s, 0, 0, 0])


def test_none_scaling_is_dr_grpo_and_bool_spellings():
    adv, _ = group_advantages(REWARDS, 3, "none")
    close(adv, [-1, 0, 1, 0, 0, 0])
    close(group_advantages(REWARDS, 3, False)[0], adv)
    close(group_advantages(REWARDS, 3, True)[0], group_advantages(REWARDS, 3, "group")[0])


def test_nan_rewards_are_excluded_and_get_zero():
    # Group 1 = (1, NaN, 3): scorable (1, 3), mean 2, unbiased std sqrt((1 + 1)/1) = √2 → (−1, 0, 1)/(√2 + eps),
    # the NaN row 0. Group 2 = (NaN, NaN, 4): one scorable value → std 0, A = 4 − 4 = 0; NaN rows 0.
    rewards = t(1, NAN, 3, NAN, NAN, 4)
    adv, metrics = group_advantages(rewards, 3, "group")
    a = 1 / (math.sqrt(2) + EPS)
    close(adv, [-a, 0, a, 0, 0, 0])
    close(metrics["reward"], 8 / 3)                       # nanmean of (1, 3, 4)
    close(metrics["reward_std"], math.sqrt(2) / 2)        # mean of (√2, 0)
    close(metrics["frac_reward_zero_std"], 0.5)
    # A group with no scorable reward at all stays finite (zero), in every scaling.
    for scale in ("group", "batch", "none"):
        adv, _ = group_advantages(t(NAN, NAN, 1, 2), 2, scale)
        assert torch.isfinite(adv).all() and adv[:2].eq(0).all()


def test_group_advantages_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS, 3, "per_token")
    with pytest.raises(ValueError, match="groups"):
        group_advantages(REWARDS, 4)


def test_normalize_then_sum_gdpo():
    # N = 4, G = 2, K = 2, weights (1, 0.5).
    # f1 = (1, 3 | 0, 0): group 1 mean 2, std √2 → z = ∓1/(√2 + eps) = ∓a; group 2 std 0 → z = 0, 0.
    # f2 = (NaN, 2 | 4, 8): group 1 has one scorable value → std 0, z(2) = 0, NaN stays NaN (skipped by nansum);
    #      group 2 mean 6, std sqrt((4 + 4)/1) = 2√2 → z = ∓2/(2√2 + eps) = ∓c.
    # s = z1 + 0.5·z2 (NaN skipped) = (−a, a + 0, 0 − 0.5c, 0 + 0.5c) = (−a, a, −b, b) with b = 0.5c.
    # Batch: mean 0, unbiased std sqrt((2a² + 2b²)/3); A = s/(std + eps).
    rewards = torch.tensor([[1, NAN], [3, 2], [0, 4], [0, 8]], dtype=torch.float64)
    adv = normalize_then_sum(rewards, t(1.0, 0.5), 2)
    a = 1 / (math.sqrt(2) + EPS)
    b = 0.5 * 2 / (2 * math.sqrt(2) + EPS)
    std = math.sqrt((2 * a * a + 2 * b * b) / 3)
    close(adv, [-a / (std + EPS), a / (std + EPS), -b / (std + EPS), b / (std + EPS)])


def test_normalize_then_sum_unscorable_row():
    # K = 1, G = 2: (1, 3) → z = (−a, a); (NaN, 5) → 5 alone: z = 0, NaN row unscorable.
    # s = (−a, a, NaN, 0): batch over 3 scorable values, mean 0, unbiased std sqrt(2a²/2) = a → A = ±a/(a + eps).
    rewards = torch.tensor([[1.0], [3.0], [NAN], [5.0]], dtype=torch.float64)
    adv = normalize_then_sum(rewards, t(1.0), 2)
    a = 1 / (math.sqrt(2) + EPS)
    close(adv, [-a / (a + EPS), a / (a + EPS), 0, 0])


def test_rloo_hand_example():
    # (1, 2, 3, 6): sum 12; b_i = (12 − R_i)/3 = (11/3, 10/3, 3, 2) → A = (−8/3, −4/3, 0, 4)
    # (= G/(G−1)·(R − mean) = 4/3·(−2, −1, 0, 3)).
    close(rloo_advantages(t(1, 2, 3, 6), 4), [-8 / 3, -4 / 3, 0, 4])


def test_rloo_nan_and_single_scorable():
    # (1, NaN, 3, 5): 3 scorable, sum 9 → b = (4, ·, 3, 2) → A = (−3, 0, 0, 3).
    # (NaN, 7, NaN, NaN): a single scorable member has no baseline → 0.
    adv = rloo_advantages(t(1, NAN, 3, 5, NAN, 7, NAN, NAN), 4)
    close(adv, [-3, 0, 0, 3, 0, 0, 0, 0])


def test_rloo_normalize():
    # A = (−8/3, −4/3, 0, 4): mean 0; squares 64/9 + 16/9 + 0 + 144/9 = 224/9, unbiased var 224/27.
    adv = rloo_advantages(t(1, 2, 3, 6), 4, normalize=True)
    s = math.sqrt(224 / 27) + EPS
    close(adv, [-8 / 3 / s, -4 / 3 / s, 0, 4 / s])


def test_whiten_masked():
    # Masked (1, 2, 3, 4): mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3; masked-out 100 → 0.
    values, mask = t(1, 2, 3, 4, 100), torch.tensor([1, 1, 1, 1, 0])
    s = math.sqrt(5 / 3 + 1e-8)
    close(whiten(values, mask), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0])
    close(whiten(values, mask, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s, 0])
    # No mask: every entry; the result has mean 0 and unbiased std ~1.
    x = torch.randn(3, 7, dtype=torch.float64) * 3 + 2
    w = whiten(x)
    close(w.mean(), 0.0)
    close(w.std(), 1.0, tol=1e-6)


def test_gae_hand_example():
    # γ = 0.9, λ = 0.5 (γλ = 0.45).
    # Row 1, mask (1, 1, 1), r = (0, 0, 1), V = (0.5, 0.4, 0.3):
    #   δ2 = 1 + 0.9·0 − 0.3 = 0.7; δ1 = 0 + 0.9·0.3 − 0.4 = −0.13; δ0 = 0 + 0.9·0.4 − 0.5 = −0.14
    #   A2 = 0.7; A1 = −0.13 + 0.45·0.7 = 0.185; A0 = −0.14 + 0.45·0.185 = −0.05675; returns = A + V.
    # Row 2, mask (1, 1, 0), r = (0, 1, 5), V = (0.5, 0.4, 9) — the padded 5 and 9 must be ignored:
    #   δ1 = 1 + 0 − 0.4 = 0.6 (V beyond the last real token is 0); δ0 = 0.36 − 0.5 = −0.14
    #   A1 = 0.6; A0 = −0.14 + 0.45·0.6 = 0.13; padding 0.
    rewards = torch.tensor([[0, 0, 1], [0, 1, 5]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[-0.05675, 0.185, 0.7], [0.13, 0.6, 0.0]])
    close(ret, [[0.44325, 0.585, 1.0], [0.63, 1.0, 0.0]])


def _naive_gae(rewards, values, mask, gamma, lam):
    """Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} over the real positions of each row, written as a double loop."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        deltas = []
        for k, t in enumerate(idx):
            next_value = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            deltas.append(rewards[b, t] + gamma * next_value - values[b, t])
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k))
    return adv


def test_gae_matches_naive_double_loop_with_left_padding_and_holes():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 9, generator=g, dtype=torch.float64)
    values = torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [0] * 3 + [1] * 6, [1, 1, 0, 0, 1, 1, 1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = _naive_gae(rewards, values, mask, 0.95, 0.9)
    close(adv, expected)
    close(ret, torch.where(mask.bool(), expected + values, 0.0))


def test_gae_lambda_one_is_monte_carlo():
    # γ = λ = 1: Â_t = Σ_{s ≥ t} r_s − V_t (the telescoping sum of δ).
    rewards = torch.tensor([[0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 1.5, 0.5, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[1.0, 0.5, 1.5, 0.0]])
    close(ret, [[2.0, 2.0, 2.0, 0.0]])


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 512)
    assert fixed.value == 0.05
    # init 0.2, target 6, horizon 10000.
    # KL 9: e = clip(9/6 − 1, ±0.2) = 0.2 → β = 0.2·(1 + 0.2·512/10000) = 0.2·1.01024 = 0.202048.
    # KL 5.4: e = 5.4/6 − 1 = −0.1 → β = 0.202048·(1 − 0.1·1000/10000) = 0.202048·0.99 = 0.20002752.
    adaptive = AdaptiveKLController(0.2, 6.0, 10000)
    adaptive.update(torch.tensor(9.0), 512)
    assert adaptive.value == pytest.approx(0.202048, abs=1e-12)
    adaptive.update(5.4, 1000)
    assert adaptive.value == pytest.approx(0.20002752, abs=1e-12)
