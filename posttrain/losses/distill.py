"""Distillation losses: the generalized Jensen–Shannon divergence between a teacher's and a student's next-token
distributions (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", Eq. 1), exact over the vocabulary or over the teacher's top-k tokens plus one bucket for the rest.

    JSD(β)(T ‖ S) = β·KL(T ‖ M) + (1 − β)·KL(S ‖ M),   M = β·T + (1 − β)·S,   0 < β < 1
    β = 0: KL(T ‖ S)  (forward KL: the student covers the teacher's mass)
    β = 1: KL(S ‖ T)  (reverse KL: mode seeking)

T and S are softmax(logits / temperature) of each model (no T² factor). JSD(β) itself tends to 0 at both ends; the
two KLs at β ∈ {0, 1} are the conventions of TRL 1.16's DistillationTrainer and GKDTrainer, kept so that the same
β means the same loss (β = 0.5 is the ordinary JSD).

Functions here are pure: (n, V) logits (or the teacher's top-k) in, per-token divergences (n,) out, in float32 (float64
stays float64); the teacher's side carries no gradient. Masking and reduction belong to the caller (the trainer
selects the trained tokens and reduces with the global token count, `losses/reduce.py`).
Not here: running the models or their heads chunk by chunk (`models/teacher.py`).
"""

from __future__ import annotations

import math

import torch


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def divergence_from_logps(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β) per row between two distributions given as log-probabilities over the last dimension.

    Args: student_logps, teacher_logps (n, K) normalised log-probs (−inf allowed where a probability is 0);
    beta in [0, 1]. Returns: (n,) divergences (≥ 0). Entries with probability 0 contribute 0 (x·log x → 0).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher_logps, student_logps)
    if beta == 1.0:
        return _kl(student_logps, teacher_logps)
    mixture = torch.logaddexp(teacher_logps + math.log(beta), student_logps + math.log1p(-beta))
    return beta * _kl(teacher_logps, mixture) + (1.0 - beta) * _kl(student_logps, mixture)


def _kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row = Σ_v p_v (log p_v − log q_v), with 0·(anything) = 0."""
    p = p_logps.exp()
    gap = torch.where(p > 0, p_logps - q_logps, torch.zeros_like(p_logps))
    return (p * gap).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Exact JSD(β) between softmax(student_logits / τ) and softmax(teacher_logits / τ), per row.

    Args: student_logits (n, V) (differentiable), teacher_logits (n, V) (treated as constants), beta, temperature τ.
    Returns: (n,) per-token divergences. Derivation of the limits: β = 0 gives Σ t (log t − log s), β = 1 gives
    Σ s (log s − log t); the tests compare both, and β = 0.5, with sums written out by hand.
    The gradient is the closed form of `jsd_terms_and_grad`, kept from the forward: one (n, V) tensor for the
    backward instead of autograd's chain of log-softmaxes, mixture and products.
    """
    return _GeneralizedJSD.apply(student_logits, teacher_logits.detach(), beta, temperature)[0]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row as a batched dot product: no (n, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def jsd_terms_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                       temperature: float = 1.0, with_grad: bool = True):
    """(terms (n,), d Σ terms / d student_logits (n, V) or None, student entropy (n,)) of JSD(β) at temperature τ.

    With s = log softmax(z/τ), t likewise, p = eˢ, q = eᵗ and the derivative of softmax, d D/d z = (g − p·Σg)/τ for
    g = ∂D/∂s. Written out:
        β = 0: D = Σ q (t − s),           d D/d z = (p − q)/τ
        β = 1: D = Σ p (s − t),           d D/d z = p (s − t − D)/τ
        else:  m = βq + (1 − β)p,  D = β Σ q (t − log m) + (1 − β) K,  K = Σ p (s − log m),
               d D/d z = (1 − β) p (s − log m − K)/τ
    (the β·q terms of ∂D/∂s cancel against the mixture's; the tests check every case against autograd). Sums are
    batched dot products and the gradient is built in place, so a row costs few passes over V. Logits of −∞ (a
    probability of exactly 0) are handled by flooring log-probs at the dtype's lowest finite value, so 0 · (finite)
    stays 0.
    """
    z = _float(student_logits)
    zt = _float(teacher_logits).to(z.dtype)
    if temperature != 1.0:
        z, zt = z / temperature, zt / temperature
    s = torch.log_softmax(z, dim=-1)
    t = torch.log_softmax(zt, dim=-1)
    floor = torch.finfo(z.dtype).min
    if bool(z.amin() == -math.inf) or bool(zt.amin() == -math.inf):
        s.clamp_(min=floor), t.clamp_(min=floor)
    p = s.exp()
    ps = _dot(p, s)
    entropy = -ps
    grad = None
    # differences are taken entry by entry before summing (Σ q·t − Σ q·s would lose the small divergence to
    # cancellation between two entropy-sized sums in float32)
    if beta == 0.0:
        q = t.exp()
        terms = _dot(q, t.sub_(s))
        if with_grad:
            grad = p.sub_(q)
    elif beta == 1.0:
        gap = s.sub_(t)  # s − t
        terms = _dot(p, gap)
        if with_grad:
            grad = gap.sub_(terms.unsqueeze(-1)).mul_(p)  # p (s − t − D)
    else:
        q = t.exp()
        # log m = log(p + β/(1−β)·q) + log(1−β): the constant is added to the sums instead of to every entry
        log_m = torch.add(p, q, alpha=beta / (1.0 - beta)).clamp_(min=torch.finfo(z.dtype).tiny).log_()
        shift = math.log1p(-beta)
        teacher_part = _dot(q, t.sub_(log_m)) - shift
        gap = s.sub_(log_m)  # s − log m + log(1−β)
        student_part = _dot(p, gap) - shift
        terms = beta * teacher_part + (1.0 - beta) * student_part
        if with_grad:
            grad = gap.sub_((student_part + shift).unsqueeze(-1)).mul_(p).mul_(1.0 - beta)
    if grad is not None and temperature != 1.0:
        grad.div_(temperature)
    return terms, grad, entropy


class _GeneralizedJSD(torch.autograd.Function):
    """JSD(β) per row with the closed-form gradient of `jsd_terms_and_grad`; returns (terms, student entropy), the
    entropy not differentiable."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta: float, temperature: float):
        terms, grad, entropy = jsd_terms_and_grad(student_logits.detach(), teacher_logits, beta, temperature,
                                                  with_grad=student_logits.requires_grad)
        ctx.dtype = student_logits.dtype
        ctx.save_for_backward(grad if grad is not None else terms.new_zeros(0))
        ctx.mark_non_differentiable(entropy)
        return terms, entropy

    @staticmethod
    def backward(ctx, grad_terms, unused):
        (grad,) = ctx.saved_tensors
        return (grad * grad_terms.unsqueeze(-1)).to(ctx.dtype), None, None, None


def jsd_with_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`generalized_jsd` and the student's entropy at τ (detached) from the same log-softmax: ((n,), (n,))."""
    return _GeneralizedJSD.apply(student_logits, teacher_logits.detach(), beta, temperature)


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per row: (log-probs (n, k) at temperature τ, token ids (n, k))."""
    logps = torch.log_softmax(_float(teacher_logits.detach()) / temperature, dim=-1)
    values, ids = logps.topk(min(k, logps.shape[-1]), dim=-1)
    return values, ids


def _with_rest(logps: torch.Tensor) -> torch.Tensor:
    """(n, k) log-probs of k tokens → (n, k + 1): the same plus log(1 − Σ p), the mass of every other token (clamped
    at the dtype's smallest positive number so that a top-k holding all the mass stays finite and differentiable)."""
    tiny = torch.finfo(logps.dtype).tiny
    rest = (-torch.expm1(torch.logsumexp(logps, dim=-1, keepdim=True))).clamp(min=tiny).log()
    return torch.cat([logps, rest], dim=-1)


def top_k_generalized_jsd(student_logits: torch.Tensor, teacher_top_logps: torch.Tensor,
                          teacher_top_ids: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """JSD(β) between the teacher and the student coarsened to k + 1 outcomes: each of the teacher's top-k tokens,
    and "any other token" (1 − the top-k mass, for each model). Needs only the teacher's top-k log-probs and ids.

    Coarsening both distributions the same way can only lower an f-divergence (data-processing inequality), and
    KL(·‖M) with M the mixture is one too: the value is ≤ the exact `generalized_jsd` and equals it once the top-k
    holds all of both models' mass. benchmarks/DISTILLATION.md measures the gap.
    Args: student_logits (n, V); teacher_top_logps, teacher_top_ids (n, k) from `teacher_top_k` (same τ).
    Returns: (n,) per-token divergences.
    """
    student = torch.log_softmax(_float(student_logits) / temperature, dim=-1).gather(-1, teacher_top_ids)
    teacher = _float(teacher_top_logps.detach())
    return divergence_from_logps(_with_rest(student), _with_rest(teacher.to(student.dtype)), beta)
