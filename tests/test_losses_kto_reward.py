"""KTO-family and Bradley–Terry losses: hand-derived values, limits, gradient signs, metric sums."""

import math

import pytest
import torch

from posttrain.losses.kto import KTO_LOSSES, apo_zero_unpaired, kl_baseline, kto
from posttrain.losses.reward_model import bradley_terry

LOG2 = math.log(2.0)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- KTO --------------------------------------------------------------------------------------------------------


def test_kto_registry():
    assert set(KTO_LOSSES) == {"kto", "apo_zero_unpaired"}


def test_kl_baseline_mean_clamped_and_detached():
    # Δ' = (−1 + 1.5, −2 + 2.5) = (0.5, 0.5) ⇒ z0 = 0.5; reversed ⇒ mean −0.5 ⇒ clamped to 0
    policy = t(-1.0, -2.0).requires_grad_()
    z0 = kl_baseline(policy, t(-1.5, -2.5))
    assert z0.dim() == 0 and math.isclose(float(z0), 0.5) and not z0.requires_grad
    assert float(kl_baseline(t(-1.5, -2.5), t(-1.0, -2.0))) == 0.0


def test_kto_hand_values_with_reference_point():
    # Δ = (0.5, −0.5, 0), labels (D, U, D), z0 = 0.2, β = 0.1, λ_D = 1, λ_U = 1.5
    #   ex0 (D): 1 − σ(0.1·(0.5 − 0.2)) = 1 − σ(0.03)
    #   ex1 (U): 1.5·(1 − σ(0.1·(0.2 + 0.5))) = 1.5·(1 − σ(0.07))
    #   ex2 (D): 1 − σ(0.1·(0 − 0.2)) = 1 − σ(−0.02)
    policy, ref = t(-1.0, -3.0, -2.0), t(-1.5, -2.5, -2.0)
    labels = torch.tensor([True, False, True])
    loss, m = kto(policy_logps=policy, ref_logps=ref, labels=labels, kl=torch.tensor(0.2), beta=0.1,
                  desirable_weight=1.0, undesirable_weight=1.5)
    assert torch.allclose(loss, t(1 - sig(0.03), 1.5 * (1 - sig(0.07)), 1 - sig(-0.02)))
    # rewards βΔ: chosen 0.1·(0.5 + 0) = 0.05 over 2, rejected 0.1·(−0.5) = −0.05 over 1
    assert math.isclose(float(m["rewards/chosen_sum"]), 0.05) and float(m["count/chosen"]) == 2
    assert math.isclose(float(m["rewards/rejected_sum"]), -0.05) and float(m["count/rejected"]) == 1
    assert math.isclose(float(m["logps/chosen_sum"]), -3.0) and math.isclose(float(m["logps/rejected_sum"]), -3.0)
    assert math.isclose(float(m["kl"]), 0.2, rel_tol=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_kto_at_reference_is_half():
    # Δ = 0, z0 = 0 ⇒ 1 − σ(0) = ½ for both labels, times the weights
    labels = torch.tensor([True, False])
    loss, _ = kto(policy_logps=t(-1.0, -2.0), ref_logps=t(-1.0, -2.0), labels=labels, kl=0.0, beta=0.1,
                  desirable_weight=2.0, undesirable_weight=1.0)
    assert torch.allclose(loss, t(1.0, 0.5))


def test_kto_gradient_signs_and_detached_kl():
    policy = t(-1.0, -2.0).requires_grad_()
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, _ = kto(policy_logps=policy, ref_logps=t(-1.2, -1.9), labels=torch.tensor([True, False]), kl=kl, beta=0.1)
    loss.sum().backward()
    assert policy.grad[0] < 0 and policy.grad[1] > 0  # raise desirable, lower undesirable
    assert kl.grad is None  # the reference point carries no gradient


def test_apo_zero_unpaired_hand_values_limit_and_gradient():
    # Δ = (0.5, −0.5), β = 0.1, λ_U = 1.5: (1 − σ(0.05), 1.5·σ(−0.05)); at Δ = 0 both ½ (times weights)
    policy = t(-1.0, -3.0).requires_grad_()
    labels = torch.tensor([True, False])
    loss, m = apo_zero_unpaired(policy_logps=policy, ref_logps=t(-1.5, -2.5), labels=labels, beta=0.1,
                                undesirable_weight=1.5)
    assert torch.allclose(loss, t(1 - sig(0.05), 1.5 * sig(-0.05)))
    assert float(m["kl"]) == 0.0 and float(m["count/chosen"]) == 1
    loss.sum().backward()
    assert policy.grad[0] < 0 and policy.grad[1] > 0
    at_ref, _ = apo_zero_unpaired(policy_logps=t(-1.0, -2.0), ref_logps=t(-1.0, -2.0), labels=labels, kl=0.7,
                                  beta=0.1)
    assert torch.allclose(at_ref, t(0.5, 0.5))


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_kto_metrics_average_correctly_across_micro_batches(name):
    # a micro-batch with no undesirable example must not bias the running mean: sums/counts make it exact
    policy, ref = t(-1.0, -2.0, -3.0, -4.0), t(-1.5, -2.0, -2.0, -4.5)
    labels = torch.tensor([True, True, False, True])
    fn = KTO_LOSSES[name]
    whole = fn(policy_logps=policy, ref_logps=ref, labels=labels, kl=0.0, beta=0.1)[1]
    parts = [fn(policy_logps=policy[s], ref_logps=ref[s], labels=labels[s], kl=0.0, beta=0.1)[1]
             for s in (slice(0, 2), slice(2, 4))]
    for key in ("rewards/chosen_sum", "rewards/rejected_sum", "count/chosen", "count/rejected"):
        assert torch.allclose(parts[0][key] + parts[1][key], whole[key])
    assert math.isclose(float(whole["rewards/chosen_sum"] / whole["count/chosen"]), 0.1 * (0.5 + 0.0 + 0.5) / 3)


# ---- Bradley–Terry ----------------------------------------------------------------------------------------------


def test_bt_hand_values_plain():
    # r_w − r_l = (1, −0.5) ⇒ (−logσ(1), −logσ(−0.5))
    loss, m = bradley_terry(t(2.0, 0.5), t(1.0, 1.0))
    assert torch.allclose(loss, t(-logsig(1.0), -logsig(-0.5)))
    # accuracy: only pair 0 has r_w > r_l; margin = mean(1, −0.5); rewards {2, 0.5, 1, 1}
    assert math.isclose(float(m["accuracy"]), 0.5) and math.isclose(float(m["margin"]), 0.25)
    assert float(m["min_reward"]) == 0.5 and float(m["max_reward"]) == 2.0
    assert math.isclose(float(m["mean_reward"]), 1.125)


def test_bt_with_margin_and_centering():
    # m = (0.5, 0), c = 0.01: pair 0 −logσ(2 − 1 − 0.5) + 0.01·3²; pair 1 −logσ(−0.5) + 0.01·1.5²
    rw, rl = t(2.0, 0.5), t(1.0, 1.0)
    loss, m = bradley_terry(rw, rl, margin=t(0.5, 0.0), center_rewards_coefficient=0.01)
    assert torch.allclose(loss, t(-logsig(0.5) + 0.09, -logsig(-0.5) + 0.0225))
    assert math.isclose(float(m["margin"]), 0.25)  # the metric is r_w − r_l, without the data margin
    # TRL adds c·mean((r_w + r_l)²) once; the per-pair form has the same mean
    plain = bradley_terry(rw, rl, margin=t(0.5, 0.0))[0]
    assert torch.allclose(loss.mean(), plain.mean() + 0.01 * ((rw + rl) ** 2).mean())


def test_bt_equal_rewards_is_log2_and_head_shape():
    loss, _ = bradley_terry(t(0.3, -1.0).unsqueeze(-1), t(0.3, -1.0).unsqueeze(-1), margin=t(0.0, 0.0))
    assert loss.shape == (2,) and torch.allclose(loss, t(LOG2, LOG2))


def test_bt_gradient_signs():
    rw, rl = t(0.1, -0.4).requires_grad_(), t(0.2, 0.3).requires_grad_()
    loss, m = bradley_terry(rw, rl)
    loss.sum().backward()
    assert (rw.grad < 0).all() and (rl.grad > 0).all()
    assert all(not v.requires_grad for v in m.values())
