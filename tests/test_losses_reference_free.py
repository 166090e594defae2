"""ORPO and CPO-family losses: hand-derived values, limits, numerical stability, gradient signs.

Standard batch (float64): ℓ(y_w) = (−2, −3), n_w = (4, 3) ⇒ a_w = (−0.5, −1);
                          ℓ(y_l) = (−6, −1), n_l = (3, 2) ⇒ a_l = (−2, −0.5).
"""

import math

import pytest
import torch

from posttrain.losses.reference_free import CPO_LOSSES, orpo

LOG2 = math.log(2.0)


def logsig(x):
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def log_odds(a):
    """log(p/(1−p)) for p = e^a, written directly."""
    p = math.exp(a)
    return math.log(p / (1 - p))


def batch(pw=(-2.0, -3.0), pl=(-6.0, -1.0), nw=(4.0, 3.0), nl=(3.0, 2.0), **floats):
    pw, pl = (x if torch.is_tensor(x) else t(*x) for x in (pw, pl))
    out = dict(policy_chosen_logps=pw, policy_rejected_logps=pl, chosen_lengths=t(*nw), rejected_lengths=t(*nl))
    out.update(floats)
    return out


# ---- ORPO ------------------------------------------------------------------------------------------------------


def test_orpo_hand_values_and_metrics():
    # LOR = log odds(a_w) − log odds(a_l); loss = −β·logσ(LOR), β = 0.1
    lor = [log_odds(-0.5) - log_odds(-2.0), log_odds(-1.0) - log_odds(-0.5)]
    loss, m = orpo(**batch(beta=0.1))
    assert torch.allclose(loss, t(*[-0.1 * logsig(x) for x in lor]), atol=1e-12)
    assert math.isclose(float(m["log_odds_chosen"]), sum(lor) / 2, rel_tol=1e-12)
    assert math.isclose(float(m["log_odds_ratio"]), (logsig(lor[0]) + logsig(lor[1])) / 2, rel_tol=1e-12)


def test_orpo_equal_averages_is_beta_log2():
    # a_w = a_l ⇒ LOR = 0 ⇒ −β·log σ(0) = β·log 2 (even with different lengths)
    loss, _ = orpo(**batch(pw=(-2.0, -1.0), pl=(-3.0, -0.5), nw=(2.0, 2.0), nl=(3.0, 1.0), beta=0.25))
    assert torch.allclose(loss, t(0.25 * LOG2, 0.25 * LOG2))


def test_orpo_stable_at_the_ends():
    # a → 0⁻: log(1 − e^a) ≈ log(−a) (expm1 branch); a ≪ 0: log(1 − e^a) ≈ −e^a ≈ 0 (log1p branch)
    # pair 0: a_w = −1e-12, a_l = −200 ⇒ LOR ≈ (−1e-12 − log 1e-12) − (−200) ≈ 227.6 ⇒ loss ≈ e^{−227.6}
    # pair 1: the same swapped ⇒ loss = −logσ(−227.6) ≈ 227.6; pair 2: a_w = 0 exactly must stay finite
    pw = t(-1e-12, -200.0, 0.0).requires_grad_()
    pl = t(-200.0, -1e-12, -1.0).requires_grad_()
    ones = (1.0, 1.0, 1.0)
    loss, _ = orpo(**batch(pw=pw, pl=pl, nw=ones, nl=ones, beta=1.0))
    lor = (-1e-12 - math.log(1e-12)) + 200.0
    values = loss.detach()
    assert torch.isfinite(values).all()
    assert math.isclose(float(values[0]), math.exp(-lor), rel_tol=1e-6)
    assert math.isclose(float(values[1]), lor, rel_tol=1e-9)
    loss.sum().backward()
    assert torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()


def test_orpo_float32_input_is_computed_in_float32():
    loss, _ = orpo(**{k: v.float() for k, v in batch().items()}, beta=0.1)
    assert loss.dtype == torch.float32


def test_orpo_gradient_signs():
    pw, pl = t(-2.0, -3.0).requires_grad_(), t(-6.0, -1.0).requires_grad_()
    orpo(**batch(pw=pw, pl=pl, beta=0.1))[0].sum().backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()


# ---- CPO family ----------------------------------------------------------------------------------------------------


def test_cpo_registry():
    assert set(CPO_LOSSES) == {"sigmoid", "hinge", "ipo", "simpo", "alphapo"}


def test_cpo_sigmoid_hand_values_and_reward_metrics():
    # sums: z = (−2 + 6, −3 + 1) = (4, −2), β = 0.5 ⇒ βz = (2, −1); ε = 0.1
    loss, m = CPO_LOSSES["sigmoid"](**batch(beta=0.5, label_smoothing=0.1))
    assert torch.allclose(loss, t(-0.9 * logsig(2.0) - 0.1 * logsig(-2.0), -0.9 * logsig(-1.0) - 0.1 * logsig(1.0)))
    # rewards β·ℓ: chosen (−1, −1.5), rejected (−3, −0.5)
    assert math.isclose(float(m["rewards/chosen"]), -1.25) and math.isclose(float(m["rewards/rejected"]), -1.75)
    assert math.isclose(float(m["rewards/accuracies"]), 0.5) and math.isclose(float(m["rewards/margins"]), 0.5)


def test_cpo_hinge_hand_values():
    # max(0, 1 − βz) = (max(0, −1), max(0, 2))
    loss, _ = CPO_LOSSES["hinge"](**batch(beta=0.5))
    assert torch.allclose(loss, t(0.0, 2.0))


def test_cpo_ipo_hand_values():
    # averages: z = a_w − a_l = (1.5, −0.5); 1/(2β) = 1 ⇒ (0.5², (−1.5)²)
    loss, m = CPO_LOSSES["ipo"](**batch(beta=0.5))
    assert torch.allclose(loss, t(0.25, 2.25))
    assert math.isclose(float(m["rewards/chosen"]), 0.5 * (-0.75))  # β·a_w for length-normalised losses


def test_simpo_hand_values():
    # −logσ(β(a_w − a_l) − γ) with β = 2, γ = 0.5: (−logσ(2.5), −logσ(−1.5)); with ε = 0.2 the smoothed form
    loss, _ = CPO_LOSSES["simpo"](**batch(beta=2.0, simpo_gamma=0.5))
    assert torch.allclose(loss, t(-logsig(2.5), -logsig(-1.5)))
    loss, _ = CPO_LOSSES["simpo"](**batch(beta=2.0, simpo_gamma=0.5, label_smoothing=0.2))
    assert torch.allclose(loss, t(-0.8 * logsig(2.5) - 0.2 * logsig(-2.5), -0.8 * logsig(-1.5) - 0.2 * logsig(1.5)))


def test_alphapo_hand_values():
    # r(a) = (1 − e^{−αa})/α on the averages, α = 0.25, β = 2, γ = 0.5: −logσ(β(r_w − r_l) − γ)
    def r(a):
        return (1 - math.exp(-0.25 * a)) / 0.25

    expected = [-logsig(2.0 * (r(-0.5) - r(-2.0)) - 0.5), -logsig(2.0 * (r(-1.0) - r(-0.5)) - 0.5)]
    loss, m = CPO_LOSSES["alphapo"](**batch(beta=2.0, simpo_gamma=0.5, alpha=0.25))
    assert torch.allclose(loss, t(*expected))
    assert math.isclose(float(m["rewards/chosen"]), 2.0 * (r(-0.5) + r(-1.0)) / 2)


def test_alphapo_tends_to_simpo():
    simpo, _ = CPO_LOSSES["simpo"](**batch(beta=2.0))
    for alpha in (0.0, 1e-9):
        assert torch.allclose(CPO_LOSSES["alphapo"](**batch(beta=2.0, alpha=alpha))[0], simpo, atol=1e-8)


def test_alpha_reward_shape_applies_to_sum_scores_too():
    # cpo sigmoid with α = 0.1 on sums: r(ℓ) = (1 − e^{−0.1ℓ})/0.1
    def r(x):
        return (1 - math.exp(-0.1 * x)) / 0.1

    loss, _ = CPO_LOSSES["sigmoid"](**batch(beta=0.5, alpha=0.1))
    assert torch.allclose(loss, t(-logsig(0.5 * (r(-2.0) - r(-6.0))), -logsig(0.5 * (r(-3.0) - r(-1.0)))))


def test_cpo_equal_scores_limits():
    # ℓ_w = ℓ_l, n_w = n_l ⇒ z = 0: sigmoid log 2, hinge 1, ipo 1/(4β²), simpo −logσ(−γ)
    same = dict(pw=(-2.0, -3.0), pl=(-2.0, -3.0), nw=(4.0, 3.0), nl=(4.0, 3.0), beta=0.5)
    expected = {"sigmoid": LOG2, "hinge": 1.0, "ipo": 1.0, "simpo": -logsig(-0.5), "alphapo": -logsig(-0.5)}
    for name, value in expected.items():
        assert torch.allclose(CPO_LOSSES[name](**batch(**same, alpha=0.3 if name == "alphapo" else 0.0))[0],
                              t(value, value)), name


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_gradient_signs(name):
    # near z = 0 every loss decreases in z: raise the chosen, lower the rejected log-prob
    pw, pl = t(-2.0, -3.0).requires_grad_(), t(-2.1, -2.9).requires_grad_()
    loss, _ = CPO_LOSSES[name](**batch(pw=pw, pl=pl, beta=0.5, label_smoothing=0.1, alpha=0.2))
    loss.sum().backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()
