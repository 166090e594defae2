"""GRPO-family per-token losses, aggregation and its split invariance, the entropy mask, RLOO's sequence loss, KL
estimators and PPO's value/policy losses. Hand derivations are in the comments; expected numbers are written out
with math.*, never by calling the loss twice. Ratios are built as logps = old_logps + log r (float64)."""

import math

import pytest
import torch

from posttrain.configs.grpo import GRPO_LOSS_TYPES
from posttrain.losses.kl import k1, k2, k3
from posttrain.losses.policy import (
    LOSS_UNITS,
    POLICY_LOSSES,
    entropy_mask,
    grpo,
    kl_penalty,
    loss_terms,
    off_policy_sequence_mask,
    rloo_sequence_loss,
    sampler_importance_weights,
    vespo,
    vespo_weights,
)
from posttrain.losses.reduce import global_sum_reduce, local_reduce
from posttrain.losses.value import clipped_value_loss, ppo_policy_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def with_ratios(ratios, old=None):
    """(logps leaf with grad, old_logps) such that exp(logps − old_logps) = ratios."""
    ratios = torch.as_tensor(ratios, dtype=torch.float64)
    old = torch.full_like(ratios, -1.0) if old is None else old
    return (old + ratios.log()).requires_grad_(), old


def grad_of(loss, leaf):
    (g,) = torch.autograd.grad(loss.sum(), leaf)
    return g


def test_registry_matches_config():
    assert tuple(POLICY_LOSSES) == GRPO_LOSS_TYPES
    assert all(POLICY_LOSSES[name] is grpo for name in ("grpo", "bnpo", "dr_grpo", "dapo"))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("adv_shape", ["sequence", "token"])
def test_on_policy_surrogate_is_minus_advantage(level, adv_shape):
    # r = 1 everywhere ⇒ −min(A, clip(1)·A) = −A per masked token, at both levels.
    # Token level: ∂ℓ_t/∂logπ_t = −A_t·r = −A_t. Sequence level (GSPO): r = exp(mean_t log r_t) has
    # ∂r/∂logπ_s = r/n, and the row sums −A_t·r over its n tokens ⇒ ∂/∂logπ_s = −(Σ_t A_t)/n = −mean_t A_t
    # (= −A for one advantage per completion).
    logps = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = t(1.5, -0.5, 0.0) if adv_shape == "sequence" else torch.randn(3, 5, dtype=torch.float64)
    token_adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(3, 5)
    expected = -token_adv * mask
    loss, metrics = grpo(logps=logps, old_logps=logps.detach(), advantages=adv, mask=mask,
                         importance_sampling_level=level)
    close(loss, expected)
    if level == "token":
        expected_grad = expected
    else:
        row_mean = (token_adv * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        expected_grad = -row_mean * mask
    close(grad_of(loss, logps), expected_grad)
    assert metrics["clip_ratio/region_mean"] == 0


def test_clipping_hand_example_values_gradients_metrics():
    # ε = 0.2, ratios (1.3, 1.1, 0.7, 0.9) in both rows, plus a padded column with a huge ratio.
    # A = +1: −min(r, clip r) = −(1.2, 1.1, 0.7, 0.9); token 0 takes the clipped branch ⇒ zero gradient, the others
    #         −r: (0, −1.1, −0.7, −0.9).
    # A = −1: −min(−r, −clip r) = max(r, clip r) = (1.3, 1.1, 0.8, 0.9); token 2 is clipped (0.7 → 0.8) ⇒ gradient
    #         (1.3, 1.1, 0, 0.9).
    # Metrics over the 8 masked tokens: high-clipped (r > 1.2, A > 0) = 1, low-clipped (r < 0.8, A < 0) = 1.
    ratios = [[1.3, 1.1, 0.7, 0.9, 1e30], [1.3, 1.1, 0.7, 0.9, 1e30]]
    logps, old = with_ratios(ratios)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    for name in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, metrics = POLICY_LOSSES[name](logps=logps, old_logps=old, advantages=t(1, -1), mask=mask,
                                            epsilon_low=0.2, epsilon_high=0.2)
        close(loss, [[-1.2, -1.1, -0.7, -0.9, 0], [1.3, 1.1, 0.8, 0.9, 0]])
        close(grad_of(loss, logps), [[0, -1.1, -0.7, -0.9, 0], [1.3, 1.1, 0, 0.9, 0]])
        close(metrics["clip_ratio/low_mean"], 1 / 8, tol=1e-7)
        close(metrics["clip_ratio/high_mean"], 1 / 8, tol=1e-7)
        close(metrics["clip_ratio/region_mean"], 2 / 8, tol=1e-7)


def test_clipping_engages_exactly_past_one_plus_minus_epsilon():
    # Just inside the range the unclipped branch carries gradient ∓A·r; just outside it is flat.
    h = 1e-6
    logps, old = with_ratios([[1.2 - h, 1.2 + h, 0.8 + h, 0.8 - h]])
    pos = grad_of(grpo(logps=logps, old_logps=old, advantages=t(1.0), mask=torch.ones(1, 4),
                       epsilon_low=0.2, epsilon_high=0.2)[0], logps)
    close(pos[0, :2], [-(1.2 - h), 0.0])
    neg = grad_of(grpo(logps=logps, old_logps=old, advantages=t(-1.0), mask=torch.ones(1, 4),
                       epsilon_low=0.2, epsilon_high=0.2)[0], logps)
    close(neg[0, 2:], [0.8 + h, 0.0])
    # Asymmetric clip-higher: with ε_high = 0.28 a ratio of 1.25 is not clipped for A > 0.
    logps, old = with_ratios([[1.25]])
    loss, _ = grpo(logps=logps, old_logps=old, advantages=t(1.0), mask=torch.ones(1, 1),
                   epsilon_low=0.2, epsilon_high=0.28)
    close(loss, [[-1.25]])
    # epsilon_high=None falls back to epsilon_low (TRL): 1.25 is clipped to 1.2.
    loss, _ = grpo(logps=logps, old_logps=old, advantages=t(1.0), mask=torch.ones(1, 1),
                   epsilon_low=0.2, epsilon_high=None)
    close(loss, [[-1.2]])


def test_delta_caps_the_ratio():
    # r = 3, ε = 0.2. A = −1: without δ, −min(−3, −1.2) = 3; with δ = 1.5, r̃ = 1.5 ⇒ −min(−1.5, −1.2) = 1.5.
    # A = +1: −min(r̃, 1.2) = −1.2 either way.
    logps, old = with_ratios([[3.0], [3.0]])
    kw = dict(logps=logps, old_logps=old, advantages=t(-1, 1), mask=torch.ones(2, 1))
    close(grpo(**kw)[0], [[3.0], [-1.2]])
    close(grpo(**kw, delta=1.5)[0], [[1.5], [-1.2]])


def test_gspo_sequence_ratio_hand_and_equal_log_ratios():
    # Log-ratios (0.1, 0.3 | pad 5.0) ⇒ sequence ratio exp(0.2) = 1.2214 > 1.2.
    # A = +1 ⇒ every real token −min(1.2214, 1.2) = −1.2; A = −1 ⇒ max(1.2214, 1.2) = e^0.2.
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = t(0.1, 0.3, 5.0).repeat(2, 1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, _ = grpo(logps=logps, old_logps=old, advantages=t(1, -1), mask=mask, importance_sampling_level="sequence")
    close(loss, [[-1.2, -1.2, 0], [math.exp(0.2), math.exp(0.2), 0]])
    # With equal per-token log-ratios within each sequence, GSPO equals the token level, for every loss.
    c = t(0.3, -0.4, 0.05).unsqueeze(1)
    old = torch.randn(3, 4, dtype=torch.float64)
    logps = old + c
    logps[2, 3] = 9.0  # padding: different log-ratio, outside the mask
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    adv = t(1.0, -2.0, 0.5)
    for name, fn in POLICY_LOSSES.items():
        kw = dict(logps=logps, old_logps=old, advantages=adv, mask=mask, epsilon_high=0.28)
        close(fn(**kw, importance_sampling_level="sequence")[0], fn(**kw, importance_sampling_level="token")[0])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo(logps=logps, old_logps=old, advantages=adv, mask=mask, importance_sampling_level="sentence")


def test_cispo_weight_is_clipped_and_detached():
    # r = 2 on every token, ε_high = 1.5 ⇒ weight sg(min(2, 1.5)) = 1.5; ℓ = −1.5·A·logπ.
    # logπ = (log 0.5, log 0.25), A = (+1, −1): row 0 = (1.5 log 2, 1.5 log 4), row 1 the negatives.
    # Gradient flows only through logπ: ∂ℓ/∂logπ = −1.5·A (no term from the ratio).
    # cispo_clip_ratio: r > 1.5 and A > 0 ⇒ the 2 tokens of row 0 out of 4.
    old = t(math.log(0.25), math.log(0.125)).repeat(2, 1)
    logps = (old + math.log(2.0)).requires_grad_()
    loss, metrics = POLICY_LOSSES["cispo"](logps=logps, old_logps=old, advantages=t(1, -1), mask=torch.ones(2, 2),
                                           epsilon_high=1.5)
    close(loss, [[1.5 * math.log(2), 1.5 * math.log(4)], [-1.5 * math.log(2), -1.5 * math.log(4)]])
    close(grad_of(loss, logps), [[-1.5, -1.5], [1.5, 1.5]])
    close(metrics["cispo_clip_ratio"], 0.5)
    # Below the cap the weight is r itself, still detached: gradient −r·A = −1.2·A (not −1.2·A·(1 + logπ)).
    logps, old = with_ratios([[1.2]], old=torch.full((1, 1), math.log(0.3), dtype=torch.float64))
    loss, _ = POLICY_LOSSES["cispo"](logps=logps, old_logps=old, advantages=t(2.0), mask=torch.ones(1, 1),
                                     epsilon_high=5.0)
    close(loss, [[-1.2 * 2.0 * math.log(0.36)]])
    close(grad_of(loss, logps), [[-2.4]])


def test_sapo_soft_gate():
    # r = 1: σ(0) = ½ ⇒ ℓ = −(4/τ)·½·A = −2A/τ; τ = 1 for A = 2 ⇒ −4; τ = 1.05 for A = −3 ⇒ 6/1.05.
    # Gradient at r = 1: −(4/τ)·τ·σ'(0)·A = −A (σ'(0) = ¼), the surrogate's on-policy gradient.
    logps = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = POLICY_LOSSES["sapo"](logps=logps, old_logps=logps.detach(), advantages=t(2, -3), mask=torch.ones(2, 3))
    close(loss, [[-4.0] * 3, [6 / 1.05] * 3])
    close(grad_of(loss, logps), [[-2.0] * 3, [3.0] * 3])
    # Off-policy: r = 1.5, A = 2 (τ = 1): −4·σ(0.5)·2; r = 0.5, A = −1 (τ = 1.05): (4/1.05)·σ(−0.525).
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    logps, old = with_ratios([[1.5], [0.5]])
    loss, _ = POLICY_LOSSES["sapo"](logps=logps, old_logps=old, advantages=t(2, -1), mask=torch.ones(2, 1),
                                    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    close(loss, [[-8 * sig(0.5)], [4 / 1.05 * sig(-0.525)]])


# Aggregation: ℓ = ((1, 2, 3, pad), (4, pad, pad, pad)), masked tokens 4, Σ = 10.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_loss_terms_hand_values():
    terms, unit = loss_terms(PER_TOKEN, MASK, "grpo")
    assert unit == "sequence"
    close(terms, [2.0, 4.0])                                                    # per-sequence token means
    close(loss_terms(PER_TOKEN, MASK, "sapo")[0], [2.0, 4.0])
    close(loss_terms(PER_TOKEN, MASK, "dr_grpo", max_completion_length=4)[0], [1.5, 1.0])  # Σ / L per sequence
    for loss_type in ("bnpo", "dapo", "cispo"):
        terms, unit = loss_terms(PER_TOKEN, MASK, loss_type)
        assert unit == "token" and float(terms.sum()) == 10.0                   # masked ℓ, Σ = 10
    close(global_sum_reduce(loss_terms(PER_TOKEN, MASK, "grpo")[0], 2), 3.0)        # mean of (2, 4)
    close(global_sum_reduce(loss_terms(PER_TOKEN, MASK, "bnpo")[0], 4), 2.5)        # 10 / 4
    close(global_sum_reduce(loss_terms(PER_TOKEN, MASK, "dr_grpo", max_completion_length=4)[0], 2), 1.25)  # 10/(2·4)
    close(global_sum_reduce(loss_terms(PER_TOKEN, MASK, "cispo")[0], torch.tensor(8.0), 2), 2.5)  # 10·2/8
    close(local_reduce(loss_terms(PER_TOKEN, MASK, "bnpo")[0], 4, 2), 1.25)   # 10 / 4 / GA 2
    assert set(LOSS_UNITS) == set(GRPO_LOSS_TYPES)
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_terms(PER_TOKEN, MASK, "dr_grpo")
    with pytest.raises(ValueError, match="Unknown loss_type"):
        loss_terms(PER_TOKEN, MASK, "gpg")


def _split_loss(x, mask, loss_type, processes, accumulation, local=False):
    """What the optimizer sees when a batch of rows is split over `processes` × `accumulation` micro-batches:
    each micro-batch's loss is its terms' sum × P / the whole step's count of its unit (or, local=True, ÷ its own
    count ÷ GA: TRL's per-micro-batch normalisation); a process sums its micro-batches; DDP averages the
    processes' gradients, i.e. the loss is the mean over processes."""
    rows = x.shape[0] // (processes * accumulation)
    pieces = [slice(i * rows, (i + 1) * rows) for i in range(processes * accumulation)]
    terms_all, unit = loss_terms(x, mask, loss_type, max_completion_length=x.shape[1])
    count = mask.sum() if unit == "token" else torch.tensor(float(x.shape[0]))
    total = 0.0
    for piece in pieces:
        terms, _ = loss_terms(x[piece], mask[piece], loss_type, max_completion_length=x.shape[1])
        if local:
            own = mask[piece].sum() if unit == "token" else rows
            total = total + local_reduce(terms, own, accumulation) / processes
        else:
            total = total + global_sum_reduce(terms, count, processes) / processes
    return total, global_sum_reduce(terms_all, count)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_every_loss_type_is_invariant_to_how_the_step_is_split(loss_type):
    # 8 rows of varying lengths: 1 process × 4 accumulation steps = 2 × 2 = 4 × 1 = the whole batch at once, in
    # value and in gradient, for every loss type (global normalisers: the unit counted over the whole step).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    results = []
    for processes, accumulation in ((1, 4), (2, 2), (4, 1), (1, 1)):
        split, whole = _split_loss(x, mask, loss_type, processes, accumulation)
        results.append((split.detach(), torch.autograd.grad(split, x)[0]))
        close(split, whole.detach())
    for value, grad in results[1:]:
        close(value, results[0][0])
        close(grad, results[0][1])


def test_trl_local_normalisation_is_not_invariant_for_bnpo():
    # The parity switch (loss_normalization="trl"): bnpo weighs micro-batches equally whatever their token counts,
    # so 1 × 4 differs from the whole batch; grpo/dr_grpo (equal rows per micro-batch) still agree.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([6, 1, 3, 5, 2, 6, 4, 1]).unsqueeze(1)
    split, whole = _split_loss(x, mask, "bnpo", 1, 4, local=True)
    assert abs(float(split) - float(whole)) > 1e-3
    for loss_type in ("grpo", "dr_grpo", "sapo"):
        split, whole = _split_loss(x, mask, loss_type, 2, 2, local=True)
        close(split, whole)


def test_entropy_mask_quantile():
    # Masked entropies 0.1, 0.5, 0.9, 0.3, 0.7, 0.4 (the padded 7.0 and 0.2 do not count); sorted
    # 0.1, 0.3, 0.4, 0.5, 0.7, 0.9. ρ = 0.5 ⇒ 0.5-quantile at position 0.5·5 = 2.5 ⇒ (0.4 + 0.5)/2 = 0.45
    # ⇒ keep 0.5, 0.9, 0.7. ρ = 0.01 ⇒ 0.99-quantile at 4.95 ⇒ 0.7 + 0.95·0.2 = 0.89 ⇒ keep 0.9 only.
    # ρ = 1 ⇒ the minimum ⇒ keep every masked token.
    entropies = torch.tensor([[0.1, 0.5, 0.9, 7.0], [0.3, 0.7, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    assert entropy_mask(entropies, mask, 0.5).tolist() == [[False, True, True, False], [False, True, False, False]]
    assert entropy_mask(entropies, mask, 0.01).tolist() == [[False, False, True, False], [False] * 4]
    assert entropy_mask(entropies, mask, 1.0).tolist() == mask.bool().tolist()
    # A pool (all processes' entropies) sets the threshold: 0.5-quantile of (0, 0.6, 0.8, 1, 2) = 0.8 ⇒ keep 0.9.
    pool = torch.tensor([0.0, 0.6, 0.8, 1.0, 2.0])
    assert entropy_mask(entropies, mask, 0.5, pool=pool).tolist() == [[False, False, True, False], [False] * 4]
    assert not entropy_mask(entropies, torch.zeros_like(mask), 0.2).any()


def test_rloo_sequence_loss():
    # ρ = (1.5, 0.5, 1.0), A = (1, −1, 2), ε = 0.2: −min(1.5, 1.2) = −1.2; −min(−0.5, −0.8) = 0.8; −2.
    # Clipped: sequence 0 high, sequence 1 low ⇒ gradients 0; sequence 2: −A·ρ = −2.
    old = t(-3.0, -2.0, -1.0)
    seq = (old + t(1.5, 0.5, 1.0).log()).requires_grad_()
    loss, metrics = rloo_sequence_loss(seq_logps=seq, old_seq_logps=old, advantages=t(1, -1, 2),
                                       epsilon_low=0.2, epsilon_high=0.2)
    close(loss, [-1.2, 0.8, -2.0])
    close(grad_of(loss, seq), [0.0, 0.0, -2.0])
    close(metrics["clip_ratio/high_mean"], 1 / 3, tol=1e-7)
    close(metrics["clip_ratio/low_mean"], 1 / 3, tol=1e-7)
    close(metrics["clip_ratio/region_mean"], 2 / 3, tol=1e-7)


def test_kl_estimators():
    # logπ = log 0.5, logπref = log 0.25: d = ref − logπ = log 0.5 ⇒ k3 = 0.5 − log 0.5 − 1 = log 2 − 0.5;
    # k1 = logπ − ref = log 2; k2 = ½ (log 2)².
    logps, ref = t(math.log(0.5)), t(math.log(0.25))
    close(k3(logps, ref), [math.log(2) - 0.5])
    close(k1(logps, ref), [math.log(2)])
    close(k2(logps, ref), [0.5 * math.log(2) ** 2])
    a, b = torch.randn(4, 7, dtype=torch.float64) * 3, torch.randn(4, 7, dtype=torch.float64) * 3
    assert (k3(a, b) >= 0).all()
    close(k3(a, a), torch.zeros(4, 7))
    # Unbiased: the exact expectation over x ~ π of k1 and of k3 is KL(π ‖ πref) = Σ π log(π/πref).
    pi, pref = t(0.5, 0.3, 0.2), t(0.2, 0.2, 0.6)
    kl = float((pi * (pi / pref).log()).sum())
    close((pi * k1(pi.log(), pref.log())).sum(), kl)
    close((pi * k3(pi.log(), pref.log())).sum(), kl)


def test_clipped_value_loss():
    # c = 0.2. t0: V = 1.0, V_old = 0.8 ⇒ clip(1.0, 0.6, 1.0) = 1.0, both (1 − 1.5)² = 0.25 ⇒ 0.125.
    # t1: V = 2.0, V_old = 1.0 ⇒ clipped 1.2: (2 − 3)² = 1 vs (1.2 − 3)² = 3.24 ⇒ ½·3.24 = 1.62, clipped branch
    #     wins (counted in clipfrac) and V is outside the clip range ⇒ zero gradient.
    # t2: V = V_old = 0.5 ⇒ (0.5 − 1)² = 0.25 ⇒ 0.125, gradient V − R = −0.5. t3 padding ⇒ 0. clipfrac = 1/3.
    values = t(1.0, 2.0, 0.5, 9.0).unsqueeze(0).requires_grad_()
    old, returns = t(0.8, 1.0, 0.5, 0.0).unsqueeze(0), t(1.5, 3.0, 1.0, 0.0).unsqueeze(0)
    loss, metrics = clipped_value_loss(values, old, returns, torch.tensor([[1, 1, 1, 0]]), clip_range=0.2)
    close(loss, [[0.125, 1.62, 0.125, 0.0]])
    g = grad_of(loss, values)
    close(g[0, 1:], [0.0, -0.5, 0.0])
    close(metrics["clipfrac"], 1 / 3, tol=1e-7)


def test_ppo_policy_loss_is_grpo_with_symmetric_clip():
    # log-ratios (0.1, −0.2, pad 3.0) ⇒ approxkl = ½·(0.01 + 0.04)/2 = 0.0125.
    old = torch.zeros(1, 3, dtype=torch.float64)
    logps = t(0.1, -0.2, 3.0).unsqueeze(0)
    adv = t(1.0, -1.0, 5.0).unsqueeze(0)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = ppo_policy_loss(logps, old, adv, mask, clip_range=0.1)
    ref, clip = grpo(logps=logps, old_logps=old, advantages=adv, mask=mask, epsilon_low=0.1, epsilon_high=0.1)
    close(loss, ref)
    # c = 0.1: r = e^0.1 = 1.105 > 1.1 with A > 0 ⇒ −min(1.105, 1.1) = −1.1 (clipped);
    # r = e^−0.2 = 0.819 < 0.9 with A < 0 ⇒ −min(−0.819, −0.9) = 0.9 (clipped); clipfrac = 2/2.
    close(loss, [[-1.1, 0.9, 0.0]])
    close(metrics["approxkl"], 0.0125, tol=1e-7)
    close(metrics["clipfrac"], clip["clip_ratio/region_mean"])
    close(metrics["clipfrac"], 1.0, tol=1e-7)


def test_kl_penalty_bias_correction_hand_values_and_gradient():
    """k3 with d = ref − logp: value e^d − d − 1; times r = exp(logp − old) under bias correction. On-policy (r = 1)
    the value is unchanged but the gradient gains k3: ∂(r·k3)/∂logp = r·k3 + r·(1 − e^d)."""
    logps = t(-1.0, -2.0, -0.5).reshape(1, 3).requires_grad_()
    ref = t(-1.5, -1.0, -0.5).reshape(1, 3)
    mask = torch.tensor([[True, True, False]])
    d = [-0.5, 1.0]
    k3s = [math.exp(x) - x - 1 for x in d]
    plain = kl_penalty(logps=logps, ref_logps=ref, old_logps=logps.detach(), mask=mask, bias_correction=False)
    close(plain, [k3s + [0.0]])
    close(grad_of(plain, logps), [[1 - math.exp(x) for x in d] + [0.0]])
    on_policy = kl_penalty(logps=logps, ref_logps=ref, old_logps=logps.detach(), mask=mask)
    close(on_policy, [k3s + [0.0]])
    close(grad_of(on_policy, logps), [[k + 1 - math.exp(x) for k, x in zip(k3s, d)] + [0.0]])
    old = t(-1.2, -1.5, -0.5).reshape(1, 3)  # r = e^0.2, e^-0.5
    r = [math.exp(0.2), math.exp(-0.5)]
    off = kl_penalty(logps=logps, ref_logps=ref, old_logps=old, mask=mask)
    close(off, [[ri * k for ri, k in zip(r, k3s)] + [0.0]])
    seq = kl_penalty(logps=logps, ref_logps=ref, old_logps=old, mask=mask, importance_sampling_level="sequence")
    r_seq = math.exp((0.2 - 0.5) / 2)  # GSPO: one length-normalised ratio per sequence
    close(seq, [[r_seq * k for k in k3s] + [0.0]])


def test_luspo_sums_each_sequence_then_averages_sequences():
    # LUSPO = GSPO's clipped objective, each sequence's loss summed over its tokens (not divided by its length):
    # rows of 3 and 1 masked tokens with per-token loss 2 and 4 ⇒ terms (6, 4), unit "sequence" ⇒ loss (6+4)/2 = 5.
    per_token = t(2.0, 2.0, 2.0, 9.0, 4.0, 9.0, 9.0, 9.0).reshape(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    terms, unit = loss_terms(per_token, mask, "luspo")
    close(terms, [6.0, 4.0])
    assert unit == "sequence"
    close(global_sum_reduce(terms, 2), 5.0)
    assert POLICY_LOSSES["luspo"] is grpo
    # on-policy with the sequence ratio: ℓ_t = −A on each token ⇒ term −n·A; gradient ∂/∂logπ_s = −A (n tokens,
    # each ∂r/∂logπ_s = 1/n, times n rows' worth of −A·r summed): −A·n·(1/n) = −A per token
    logps = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo(logps=logps, old_logps=logps.detach(), advantages=t(2.0), mask=torch.ones(1, 3).bool(),
                   importance_sampling_level="sequence")
    terms, _ = loss_terms(loss, torch.ones(1, 3).bool(), "luspo")
    close(terms, [-6.0])
    close(grad_of(terms, logps), [[-2.0, -2.0, -2.0]])


def test_vespo_weight_hand_values():
    # φ(w) = e^λ·w^k·e^(−λw): φ(1) = 1 for every (k, λ). Summed log-ratio over the mask: tokens log r = (0.2, 0.3,
    # [0.9 unmasked]) ⇒ log w = 0.5, w = e^0.5. A ≥ 0 ⇒ k = 2, λ = 3: log φ = 3 + 2·0.5 − 3·e^0.5;
    # A < 0 ⇒ k = 3, λ = 2: log φ = 2 + 3·0.5 − 2·e^0.5.
    log_ratio = t(0.2, 0.3, 0.9, 0.2, 0.3, 0.9).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]]).bool()
    phi = vespo_weights(log_ratio=log_ratio, advantages=t(1.0, -1.0).unsqueeze(1), mask=mask)
    w = math.exp(0.5)
    close(phi, [[math.exp(3 + 1.0 - 3 * w)], [math.exp(2 + 1.5 - 2 * w)]])
    close(vespo_weights(log_ratio=torch.zeros(2, 3, dtype=torch.float64), advantages=t(1.0, -1.0).unsqueeze(1),
                        mask=mask), [[1.0], [1.0]])
    # the sampler correction multiplies w: ρ = e^−0.5 on both masked tokens ⇒ log w = 0.5 − 1.0 = −0.5
    rho = torch.full((2, 3), math.exp(-0.5), dtype=torch.float64)
    phi = vespo_weights(log_ratio=log_ratio, advantages=t(1.0, -1.0).unsqueeze(1), mask=mask, sampler_ratio=rho)
    w = math.exp(-0.5)
    close(phi, [[math.exp(3 - 1.0 - 3 * w)], [math.exp(2 - 1.5 - 2 * w)]])


def test_vespo_loss_is_weighted_reinforce():
    # ℓ_t = −sg(φ)·A·log π_t; φ detached ⇒ ∂ℓ_t/∂logπ_t = −φ·A. On-policy φ = 1: gradient −A, loss −A·logπ.
    old = t(-1.0, -2.0, -0.5).reshape(1, 3)
    logps = old.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 0]]).bool()
    loss, metrics = vespo(logps=logps, old_logps=old, advantages=t(1.5), mask=mask)
    close(loss, [[1.5, 3.0, 0.0]])
    close(grad_of(loss, logps), [[-1.5, -1.5, 0.0]])
    close(metrics["vespo/phi_seq_mean"], 1.0)
    # off-policy: summed log-ratio 0.4 ⇒ φ = exp(3 + 2·0.4 − 3·e^0.4) for A > 0; gradient −φ·A
    logps = (old + t(0.1, 0.3, 5.0).reshape(1, 3)).requires_grad_()
    loss, _ = vespo(logps=logps, old_logps=old, advantages=t(1.5), mask=mask)
    phi = math.exp(3 + 0.8 - 3 * math.exp(0.4))
    close(grad_of(loss, logps), [[-1.5 * phi, -1.5 * phi, 0.0]])


def test_sampler_importance_weights_modes():
    # d_t = old − sampler on the mask: row 0: (0.5, −0.2, [pad]), row 1: (NaN → 0, 1.5, [pad]).
    old = t(-1.0, -1.0, -1.0, -1.0, -1.0, -1.0).reshape(2, 3)
    sampler = t(-1.5, -0.8, 7.0, math.nan, -2.5, 7.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    token = sampler_importance_weights(old_logps=old, sampler_logps=sampler, mask=mask, mode="token_truncate",
                                       clip_max=3.0)
    close(token, [[math.exp(0.5), math.exp(-0.2), 1.0], [1.0, 3.0, 1.0]])  # e^1.5 = 4.48 truncated at 3
    token = sampler_importance_weights(old_logps=old, sampler_logps=sampler, mask=mask, mode="token_mask",
                                       clip_min=0.9, clip_max=3.0)
    close(token, [[math.exp(0.5), 0.0, 1.0], [1.0, 0.0, 1.0]])  # e^−0.2 = 0.82 < 0.9 and 4.48 > 3: masked
    seq = sampler_importance_weights(old_logps=old, sampler_logps=sampler, mask=mask, mode="sequence_truncate",
                                     clip_min=0.5, clip_max=1.2)
    close(seq, [[1.2], [1.2]])  # e^0.3 = 1.35, e^1.5: both truncated at 1.2
    seq = sampler_importance_weights(old_logps=old, sampler_logps=sampler, mask=mask, mode="sequence_mask",
                                     clip_max=3.0)
    close(seq, [[math.exp(0.3)], [0.0]])  # e^1.5 > 3: the sequence is dropped
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        sampler_importance_weights(old_logps=old, sampler_logps=sampler, mask=mask, mode="token")


def test_off_policy_sequence_mask():
    # mean KL (sampler − πθ) over the mask: row 0 (0.8, 0.4) → 0.6, row 1 (0.1, 0.1) → 0.1. δ = 0.5: row 0 is
    # dropped when A < 0, kept when A ≥ 0; row 1 always kept.
    logps = torch.full((2, 3), -1.0, dtype=torch.float64)
    sampler = t(-0.2, -0.6, 9.0, -0.9, -0.9, 9.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    keep = off_policy_sequence_mask(logps=logps, sampler_logps=sampler, advantages=t(-1.0, -1.0), mask=mask,
                                    threshold=0.5)
    close(keep, [[0.0], [1.0]])
    keep = off_policy_sequence_mask(logps=logps, sampler_logps=sampler, advantages=t(0.0, -1.0), mask=mask,
                                    threshold=0.5)
    close(keep, [[1.0], [1.0]])
