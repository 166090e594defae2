"""DPO-family losses: hand-derived values, limits at policy = reference, gradient signs, f-divergences, LD-DPO, WPO.

Standard batch used by the hand-value tests (float64, two pairs):
  policy ℓθ(y_w) = (-1, -2),  ℓθ(y_l) = (-3, -1.5)
  ref    ℓref(y_w) = (-1.5, -2), ℓref(y_l) = (-2, -2.5)
  ⇒ Δw = (0.5, 0), Δl = (-1, 1), δ = Δw − Δl = (1.5, -1); β = 0.5 ⇒ βδ = (0.75, -0.5)
  lengths n(y_w) = (2, 4), n(y_l) = (3, 5).
Expected numbers are written out with math.* from the formulas, never by calling the loss twice.
"""

import math
import random

import pytest
import torch

from posttrain.losses.preference import DPO_LOSSES, F_DIVERGENCES, f_divergence_score, ld_sequence_logps, wpo_weights

BETA = 0.5
LOG2 = math.log(2.0)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def terms(pw=(-1.0, -2.0), pl=(-3.0, -1.5), rw=(-1.5, -2.0), rl=(-2.0, -2.5), nw=(2.0, 4.0), nl=(3.0, 5.0),
          f_type="reverse_kl", **floats):
    """Keyword arguments for any DPO loss, built like the trainer builds them."""
    pw, pl = (x if torch.is_tensor(x) else t(*x) for x in (pw, pl))
    rw, rl, nw, nl = t(*rw), t(*rl), t(*nw), t(*nl)
    cw, cl = pw - rw, pl - rl
    out = dict(chosen_scores=f_divergence_score(cw, f_type), rejected_scores=f_divergence_score(cl, f_type),
               chosen_logratios=cw, rejected_logratios=cl, policy_chosen_logps=pw, policy_rejected_logps=pl,
               ref_chosen_logps=rw, ref_rejected_logps=rl, chosen_lengths=nw, rejected_lengths=nl, beta=BETA)
    out.update(floats)
    return out


def check(name, expected, **floats):
    loss, metrics = DPO_LOSSES[name](**terms(**floats))
    assert loss.shape == (2,)
    assert torch.allclose(loss, t(*expected), atol=1e-12), (name, loss, expected)
    return metrics


# ---- registry ------------------------------------------------------------------------------------------------

ALL = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
       "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def test_registry_has_exactly_the_trl_names():
    assert set(DPO_LOSSES) == set(ALL) and len(DPO_LOSSES) == 15
    assert F_DIVERGENCES == ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@pytest.mark.parametrize("name", ALL)
def test_every_loss_dispatches_with_the_shared_terms(name):
    # the registry contract: one call form for all, (B,) loss, detached 0-dim metrics
    loss, metrics = DPO_LOSSES[name](**terms(label_smoothing=0.1, discopop_tau=0.05))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


# ---- hand values on the standard batch -----------------------------------------------------------------------


def test_sigmoid_hand_values():
    # −logσ(βδ), βδ = (0.75, −0.5)
    check("sigmoid", [-logsig(0.75), -logsig(-0.5)])


def test_sigmoid_label_smoothing_is_cdpo():
    # cDPO, ε = 0.1: −0.9·logσ(βδ) − 0.1·logσ(−βδ)
    check("sigmoid", [-0.9 * logsig(0.75) - 0.1 * logsig(-0.75), -0.9 * logsig(-0.5) - 0.1 * logsig(0.5)],
          label_smoothing=0.1)


def test_sigmoid_on_forward_kl_scores():
    # S = −exp(−Δ): S_w = (−e^{−0.5}, −1), S_l = (−e^{1}, −e^{−1}); δ = S_w − S_l
    d0, d1 = -math.exp(-0.5) + math.e, -1.0 + math.exp(-1.0)
    check("sigmoid", [-logsig(BETA * d0), -logsig(BETA * d1)], f_type="forward_kl")


def test_hinge_hand_values():
    # max(0, 1 − βδ) = (max(0, 0.25), max(0, 1.5))
    check("hinge", [0.25, 1.5])


def test_ipo_hand_values():
    # length-normalised: S_w/n_w − S_l/n_l = (0.5/2 + 1/3, 0/4 − 1/5) = (7/12, −0.2); 1/(2β) = 1
    check("ipo", [(7 / 12 - 1.0) ** 2, (-0.2 - 1.0) ** 2])


def test_exo_pair_hand_values_and_default_epsilon():
    # σ(z)[logσ(z) − log(1−ε)] + σ(−z)[logσ(−z) − log ε], z = βδ; ε defaults to 1e-3 when label_smoothing = 0
    def exo(z, eps):
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))

    check("exo_pair", [exo(0.75, 1e-3), exo(-0.5, 1e-3)])
    check("exo_pair", [exo(0.75, 0.05), exo(-0.5, 0.05)], label_smoothing=0.05)


def test_nca_pair_hand_values():
    # βS_w = (0.25, 0), βS_l = (−0.5, 0.5): −logσ(βS_w) − ½logσ(−βS_w) − ½logσ(−βS_l)
    check("nca_pair", [-logsig(0.25) - 0.5 * logsig(-0.25) - 0.5 * logsig(0.5),
                       -logsig(0.0) - 0.5 * logsig(0.0) - 0.5 * logsig(-0.5)])


def test_robust_hand_values():
    # ε = 0.2: [−0.8·logσ(z) + 0.2·logσ(−z)] / 0.6
    check("robust", [(-0.8 * logsig(0.75) + 0.2 * logsig(-0.75)) / 0.6,
                     (-0.8 * logsig(-0.5) + 0.2 * logsig(0.5)) / 0.6], label_smoothing=0.2)


def test_robust_rejects_half():
    with pytest.raises(ValueError):
        DPO_LOSSES["robust"](**terms(label_smoothing=0.5))


def test_bco_pair_hand_values():
    # −logσ(βS_w) − logσ(−βS_l) with βS_w = (0.25, 0), βS_l = (−0.5, 0.5)
    check("bco_pair", [-logsig(0.25) - logsig(0.5), -logsig(0.0) - logsig(-0.5)])


def test_sppo_hard_hand_values():
    # 1/(2β) = 1: (S_w − 1)² + (S_l + 1)² = ((−0.5)² + 0², (−1)² + 2²)
    check("sppo_hard", [0.25, 5.0])


def test_aot_hand_values():
    # u = ℓθ_w − ℓθ_l = (2, −0.5) → sorted (−0.5, 2); v = ℓref_w − ℓref_l = (0.5, 0.5) → sorted (0.5, 0.5)
    # d = (−1, 1.5), βd = (−0.5, 0.75); ε = 0.1: −0.9·logσ(βd) − 0.1·logσ(−βd)
    check("aot", [-0.9 * logsig(-0.5) - 0.1 * logsig(0.5), -0.9 * logsig(0.75) - 0.1 * logsig(-0.75)],
          label_smoothing=0.1)


def test_aot_unpaired_hand_values():
    # sorted Δw = (0, 0.5), sorted Δl = (−1, 1) ⇒ d = (1, −0.5), βd = (0.5, −0.25); ε = 0
    check("aot_unpaired", [-logsig(0.5), -logsig(-0.25)])


def test_apo_zero_hand_values():
    # (1 − σ(βΔw)) + σ(βΔl), βΔw = (0.25, 0), βΔl = (−0.5, 0.5)
    check("apo_zero", [1 - sig(0.25) + sig(-0.5), 1 - sig(0.0) + sig(0.5)])


def test_apo_down_hand_values():
    # σ(βΔw) + 1 − σ(βδ)
    check("apo_down", [sig(0.25) + 1 - sig(0.75), sig(0.0) + 1 - sig(-0.5)])


def test_discopop_hand_values():
    # z = βδ, g = σ(z/τ), τ = 0.05: (1 − g)(−logσ z) + g·e^{−z}
    def disco(z):
        g = sig(z / 0.05)
        return (1 - g) * -logsig(z) + g * math.exp(-z)

    metrics = check("discopop", [disco(0.75), disco(-0.5)], discopop_tau=0.05)
    assert math.isclose(float(metrics["discopop_mix"]), (sig(15.0) + sig(-10.0)) / 2)


def test_sft_is_token_mean_nll():
    # −ℓθ(y_w) = (1, 2), mean n_w = 3 ⇒ per pair (1/3, 2/3); mean over pairs = (1+2)/(2+4) = Σ(−ℓ)/Σn
    metrics = check("sft", [1 / 3, 2 / 3])
    assert math.isclose(float(metrics["nll_loss"]), 0.5)


def test_sft_accepts_integer_lengths():
    kw = terms()
    kw["chosen_lengths"] = torch.tensor([2, 4])
    assert torch.allclose(DPO_LOSSES["sft"](**kw)[0], t(1 / 3, 2 / 3))


def test_sigmoid_norm_hand_values():
    # β(S_w/n_w − S_l/n_l) = 0.5·(7/12, −0.2)
    check("sigmoid_norm", [-logsig(0.5 * 7 / 12), -logsig(-0.1)])


# ---- policy = reference ----------------------------------------------------------------------------------------

EPS = 1e-3
AT_ZERO = {  # loss when every Δ = 0 (β = 0.5, ε = 0 except exo's default 1e-3)
    "sigmoid": LOG2, "hinge": 1.0, "ipo": 1.0 / (4 * BETA**2),
    "exo_pair": math.log(0.5) - 0.5 * (math.log(EPS) + math.log(1 - EPS)),
    "nca_pair": 2 * LOG2, "robust": LOG2, "bco_pair": 2 * LOG2, "sppo_hard": 1.0 / (2 * BETA**2),
    "aot": LOG2, "aot_unpaired": LOG2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": (LOG2 + 1.0) / 2,
    "sigmoid_norm": LOG2,
}


@pytest.mark.parametrize("name", sorted(AT_ZERO))
def test_policy_equal_reference(name):
    same = dict(pw=(-1.5, -2.0), pl=(-2.0, -2.5))  # = the reference
    loss, _ = DPO_LOSSES[name](**terms(**same))
    assert torch.allclose(loss, t(AT_ZERO[name], AT_ZERO[name]), atol=1e-12)


def test_robust_at_zero_is_log2_for_any_epsilon():
    # [(1−ε) + (−ε)]·log 2 / (1 − 2ε) = log 2
    loss, _ = DPO_LOSSES["robust"](**terms(pw=(-1.5, -2.0), pl=(-2.0, -2.5), label_smoothing=0.3))
    assert torch.allclose(loss, t(LOG2, LOG2))


# ---- gradient signs ---------------------------------------------------------------------------------------------

RAISES_CHOSEN = set(ALL) - {"apo_down"}  # apo_down deliberately lowers the chosen likelihood
LOWERS_REJECTED = set(ALL) - {"sft"}  # sft ignores the rejected completion


@pytest.mark.parametrize("name", ALL)
def test_gradient_signs(name):
    # near policy = reference every listed loss is monotone: d loss/d ℓθ(y_w) < 0, d loss/d ℓθ(y_l) > 0,
    # so a gradient step raises the chosen and lowers the rejected log-prob
    pw = t(-1.49, -2.02).requires_grad_()
    pl = t(-2.01, -2.47).requires_grad_()
    if name == "discopop":  # non-monotone for −2.4τ < βδ < 1.5τ (see below): test at βδ = ±1 instead
        pw, pl = t(0.0, -4.0).requires_grad_(), t(-2.0, -2.0).requires_grad_()
    kw = terms(pw=pw, pl=pl, label_smoothing=0.1 if name != "exo_pair" else 0.0)
    if name == "discopop":
        kw.update(terms(pw=pw, pl=pl, rw=(0.0, 0.0), rl=(0.0, 0.0), f_type="reverse_kl"))
    loss, _ = DPO_LOSSES[name](**kw)
    loss.sum().backward()
    if name in RAISES_CHOSEN:
        assert (pw.grad < 0).all(), pw.grad
    if name in LOWERS_REJECTED:
        assert (pl.grad > 0).all(), pl.grad
    if name == "sft":
        assert pl.grad is None
    if name == "apo_down":  # σ(βΔw) dominates once Δw > 0: pushes the chosen likelihood down
        pw2 = t(0.5, 1.0).requires_grad_()
        loss, _ = DPO_LOSSES[name](**terms(pw=pw2, pl=(-9.0, -9.0), rw=(0.0, 0.0)))
        loss.sum().backward()
        assert (pw2.grad > 0).all()


def test_discopop_is_not_monotone_near_zero():
    # d/dz at z = 0⁺: the blend g = σ(z/τ) moves from the logistic (log 2) to the exponential (1) branch with
    # slope g(1−g)/τ = 5 at τ = 0.05, so d loss/dz ≈ −½·½ − ½·1 + 5·(1 − log 2) > 0: the loss rises there
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    DPO_LOSSES["discopop"](chosen_scores=z, rejected_scores=torch.zeros(1, dtype=torch.float64), beta=1.0,
                           discopop_tau=0.05)[0].sum().backward()
    assert math.isclose(float(z.grad), -0.25 - 0.5 + 5 * (1 - LOG2), rel_tol=1e-9)


@pytest.mark.parametrize("f_type", F_DIVERGENCES)
def test_sigmoid_gradient_sign_under_every_f_divergence(f_type):
    pw, pl = t(-1.0, -2.0).requires_grad_(), t(-3.0, -1.5).requires_grad_()
    DPO_LOSSES["sigmoid"](**terms(pw=pw, pl=pl, f_type=f_type))[0].sum().backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()


# ---- plain loop --------------------------------------------------------------------------------------------------


def test_sigmoid_matches_plain_python_loop():
    rng = random.Random(0)
    rows = [[rng.uniform(-30, -1) for _ in range(4)] for _ in range(7)]
    expected = []
    for pw, pl, rw, rl in rows:  # the DPO paper's Eq. 7, one pair at a time
        expected.append(-logsig(0.1 * ((pw - rw) - (pl - rl))))
    cols = [t(*col) for col in zip(*rows)]
    kw = terms()
    kw.update(chosen_scores=cols[0] - cols[2], rejected_scores=cols[1] - cols[3], beta=0.1)
    loss, _ = DPO_LOSSES["sigmoid"](**kw)
    assert torch.allclose(loss, t(*expected), atol=1e-12)
    assert math.isclose(float(loss.mean()), sum(expected) / len(expected), rel_tol=1e-12)


# ---- f-divergence scores ----------------------------------------------------------------------------------------


def test_f_divergence_hand_values():
    d = t(0.5, -1.0)
    assert torch.equal(f_divergence_score(d), d)
    assert torch.allclose(f_divergence_score(d, "forward_kl"), t(-math.exp(-0.5), -math.e))
    assert torch.allclose(f_divergence_score(d, "js_divergence"), t(logsig(0.5), logsig(-1.0)))
    # a = 0.5: exp(−0.5Δ)/(−0.5) = −2·exp(−0.5Δ)
    assert torch.allclose(f_divergence_score(d, "alpha_divergence", 0.5),
                          t(-2 * math.exp(-0.25), -2 * math.exp(0.5)))
    # a = 0 is forward KL
    assert torch.allclose(f_divergence_score(d, "alpha_divergence", 0.0), f_divergence_score(d, "forward_kl"))


def test_alpha_divergence_tends_to_reverse_kl():
    dw, dl = t(0.5, -1.0), t(-0.3, 0.2)
    assert torch.equal(f_divergence_score(dw, "alpha_divergence", 1.0), dw)
    assert torch.equal(f_divergence_score(dw, "alpha_divergence", 1.0 + 5e-7), dw)
    for a in (1 + 1e-4, 1 - 1e-4):  # δ = Δw − Δl + (a−1)(Δw² − Δl²)/2 + O((a−1)²)
        delta = f_divergence_score(dw, "alpha_divergence", a) - f_divergence_score(dl, "alpha_divergence", a)
        assert torch.allclose(delta, dw - dl, atol=1e-4)


def test_alpha_divergence_clamps_exponent():
    big = torch.tensor([100.0, -100.0], dtype=torch.float16)
    assert torch.isfinite(f_divergence_score(big, "alpha_divergence", 2.0)).all()
    assert torch.isfinite(f_divergence_score(t(1e4, -1e4), "alpha_divergence", 0.5)).all()


def test_unknown_f_divergence_raises():
    with pytest.raises(ValueError, match="reverse_kl"):
        f_divergence_score(t(0.0), "hellinger")


# ---- LD-DPO --------------------------------------------------------------------------------------------------------
# Row 0: chosen completion at positions 1..3 (n_w = 3), rejected at 2..5 (n_l = 4) ⇒ s = 3.
# Row 1: chosen at 0..1 (n_w = 2), rejected at 3..5 (n_l = 3) ⇒ s = 2. Unmasked positions hold nan/-inf.
NAN, NINF = float("nan"), float("-inf")
LD_CHOSEN = t(NAN, -1.0, -2.0, -3.0, NAN, NINF), t(-0.5, -1.5, NINF, NAN, NAN, NAN)
LD_CHOSEN_MASK = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
LD_REJECTED = t(NAN, NINF, -1.0, -1.0, -2.0, -4.0), t(NAN, NAN, NAN, -2.0, -3.0, -5.0)
LD_REJECTED_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])


def ld(alpha, chosen=None):
    chosen = torch.stack(LD_CHOSEN) if chosen is None else chosen
    return ld_sequence_logps(chosen, LD_CHOSEN_MASK, torch.stack(LD_REJECTED), LD_REJECTED_MASK, alpha)


def test_ld_dpo_hand_values():
    # α = 0.5: chosen (−6, −2) are within s; rejected row 0: −1−1−2 + 0.5·(−4) = −6; row 1: −2−3 + 0.5·(−5) = −7.5
    chosen, rejected = ld(0.5)
    assert torch.allclose(chosen, t(-6.0, -2.0)) and torch.allclose(rejected, t(-6.0, -7.5))


def test_ld_dpo_alpha_one_is_plain_sum_and_zero_truncates():
    chosen, rejected = ld(1.0)
    assert torch.allclose(chosen, t(-6.0, -2.0)) and torch.allclose(rejected, t(-8.0, -10.0))
    chosen, rejected = ld(0.0)  # truncate to the shorter: rejected keeps its first 3 resp. 2 tokens
    assert torch.allclose(chosen, t(-6.0, -2.0)) and torch.allclose(rejected, t(-4.0, -5.0))


def test_ld_dpo_bool_masks_and_gradient():
    chosen_logps = torch.nan_to_num(torch.stack(LD_REJECTED), nan=0.0, neginf=0.0).requires_grad_()
    # use the rejected row as the (longer) chosen side: positions past s get weight α
    chosen, _ = ld_sequence_logps(chosen_logps, LD_REJECTED_MASK.bool(), torch.stack(LD_CHOSEN),
                                  LD_CHOSEN_MASK.bool(), 0.25)
    chosen.sum().backward()
    expected = t(0, 0, 1, 1, 1, 0.25), t(0, 0, 0, 1, 1, 0.25)
    assert torch.allclose(chosen_logps.grad, torch.stack(expected))


# ---- WPO -------------------------------------------------------------------------------------------------------------


def test_wpo_weights_hand_values():
    # row 0: p = (0.5, 0.25), Σp² = (0.5, 0.5) ⇒ mean(log 1, log 0.5) = −½log 2 ⇒ w = 2^{−½}
    # row 1: p = 0.8, Σp² = 0.68 (0.8² + 0.2²) ⇒ w = 0.8/0.68; row 2: no completion tokens ⇒ w = 1
    logps = torch.log(t(0.5, 0.25, 0.9)).expand(3, 3).clone()
    logps[1, 0] = math.log(0.8)
    lsp2 = torch.log(t(0.5, 0.5, 0.1)).expand(3, 3).clone()
    lsp2[1, 0] = math.log(0.68)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    logps.requires_grad_()
    w = wpo_weights(logps, lsp2, mask)
    assert torch.allclose(w, t(2**-0.5, 0.8 / 0.68, 1.0))
    assert not w.requires_grad


def test_log_sum_p2_identity_from_logits():
    # the docstring's recipe: log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z); z = log(0.8, 0.2) ⇒ log 0.68
    z = torch.log(t(0.8, 0.2)) + 3.0  # any shift
    value = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    assert math.isclose(float(value), math.log(0.68), rel_tol=1e-12)
