"""SFT losses: hand-derived values, gradient signs, reduction invariance under batch splits."""

import math

import torch

from posttrain.losses.reduce import global_sum_reduce
from posttrain.losses.sft import SFT_LOSSES, dft_loss, nll_loss


def test_nll_hand_values():
    # p = (0.5, 0.25) → -log p = (log 2, log 4)
    logps = torch.log(torch.tensor([0.5, 0.25]))
    loss, metrics = nll_loss(logps)
    assert torch.allclose(loss, torch.tensor([math.log(2), math.log(4)]))
    assert metrics == {}


def test_dft_hand_values_and_gradient():
    # loss = -p·log p with p detached: values 0.5·log2, 0.25·log4; d loss/d logp = -p
    logps = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
    loss, metrics = dft_loss(logps)
    assert torch.allclose(loss, torch.tensor([0.5 * math.log(2), 0.25 * math.log(4)]))
    loss.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([-0.5, -0.25]))
    assert math.isclose(float(metrics["dft_weight"]), 0.375)


def test_nll_gradient_raises_logp():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    nll_loss(logps)[0].sum().backward()
    assert (logps.grad < 0).all()  # descending the loss increases log-probs


def test_registry_names():
    assert set(SFT_LOSSES) == {"nll", "dft"}


def test_global_reduce_is_split_invariant():
    torch.manual_seed(0)
    per_token = torch.rand(37)
    whole = per_token.mean()
    # split into 3 micro-batches (accumulation) on 2 "processes": each contributes sum * P / N_global,
    # and DDP averages over the P processes
    chunks = torch.tensor_split(per_token, 6)
    contributions = [global_sum_reduce(c, num_items=37, num_processes=2) for c in chunks]
    assert torch.allclose(sum(contributions) / 2, whole)
