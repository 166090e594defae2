"""Paired preference losses of the DPO family, plus the sequence-level pieces they need.

Every loss takes the same keyword-only arguments (all tensors (B,), one entry per (chosen, rejected) pair) so that
`DPO_LOSSES[name](**terms)` dispatches without special cases:

* `chosen_scores`, `rejected_scores`: f-divergence scores S(y) of the log-ratios (`f_divergence_score`);
* `chosen_logratios`, `rejected_logratios`: Δ(y) = ℓθ(y) − ℓref(y), summed completion log-probs;
* `policy_*_logps`, `ref_*_logps`: ℓθ(y), ℓref(y);
* `chosen_lengths`, `rejected_lengths`: completion token counts n(y);
* `beta`, `label_smoothing` (ε), `discopop_tau`: plain floats.

Each returns the unreduced per-pair loss (B,) and a dict of detached scalar metrics. Notation: δ = S(y_w) − S(y_l).
Also here: LD-DPO length-desensitised sequence log-probs and WPO pair weights (both need token-level inputs).

Not here: the forward pass and token log-probs (`models/logprobs.py`), the reward/accuracy metrics every variant
shares and the reduction over the accumulated batch (the trainer, `losses/reduce.py`), reference-free variants
(`losses/reference_free.py`), unpaired KTO (`losses/kto.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.errors import UserError

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratios: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """Score S(Δ) of a sequence log-ratio under an f-divergence regulariser (Wang et al. 2023, "Beyond Reverse KL:
    Generalizing Direct Preference Optimization with Diverse Divergence Constraints", Table 1; S = f'(π/π_ref)
    up to sign and constants that cancel in δ = S_w − S_l).

    reverse_kl: Δ; forward_kl: −exp(−Δ); js_divergence: logσ(Δ); alpha_divergence: exp((a−1)Δ)/(a−1), which is
    reverse_kl when |a − 1| < 1e-6 (the limit of δ as a → 1) and forward_kl at a = 0. The exponent (a−1)Δ is
    clamped to ±(log(max of dtype) − 1) so half precision cannot overflow.

    Args: logratios (B,); f_divergence_type one of F_DIVERGENCES; alpha = a. Returns: S (B,).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        bound = math.log(torch.finfo(logratios.dtype).max) - 1.0
        return torch.exp(((alpha - 1.0) * logratios).clamp(-bound, bound)) / (alpha - 1.0)
    raise UserError(f"Unknown f_divergence_type {f_divergence_type!r}; choose from: {', '.join(F_DIVERGENCES)}.")


def _smoothed_logistic(z: Tensor, epsilon: float) -> Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): logistic loss against a label that is flipped with probability ε."""
    loss = -F.logsigmoid(z)
    if epsilon:
        loss = (1.0 - epsilon) * loss - epsilon * F.logsigmoid(-z)
    return loss


# ---- one function per loss_type; docstrings give paper, formula, deviations. Args as in the module docstring.


def sigmoid(*, chosen_scores, rejected_scores, beta, label_smoothing=0.0, **_) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, Eq. 7): −logσ(βδ). With ε = label_smoothing > 0, conservative DPO
    (cDPO, Mitchell 2023): −(1−ε)logσ(βδ) − ε·logσ(−βδ).

    Deviation: TRL ≥ 1.x ignores label_smoothing for `sigmoid` (smoothing lives only in robust/aot); our users
    expect it to apply here. With ε = 0 (the default) this equals TRL. Returns: loss (B,), {}.
    """
    delta = chosen_scores - rejected_scores
    return _smoothed_logistic(beta * delta, label_smoothing), {}


def hinge(*, chosen_scores, rejected_scores, beta, **_) -> tuple[Tensor, Metrics]:
    """SLiC / RSO hinge (Zhao et al. 2023; Liu et al. 2023, Eq. 8): max(0, 1 − βδ). Returns: loss (B,), {}."""
    return torch.relu(1.0 - beta * (chosen_scores - rejected_scores)), {}


def ipo(*, chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta, **_) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2023, Eq. 17) with β in the role of τ: (S_w/n_w − S_l/n_l − 1/(2β))².

    As TRL, the scores are divided by the completion lengths (per-token averages); the paper uses sums.
    Returns: loss (B,), {}.
    """
    delta = chosen_scores / chosen_lengths - rejected_scores / rejected_lengths
    return (delta - 1.0 / (2.0 * beta)) ** 2, {}


def exo_pair(*, chosen_scores, rejected_scores, beta, label_smoothing=0.0, **_) -> tuple[Tensor, Metrics]:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 11
    with K = 2): KL(p_θ ‖ p_ε) between the model's pair distribution p_θ = (σ(βδ), σ(−βδ)) and the ε-smoothed
    label (1−ε, ε): σ(βδ)[logσ(βδ) − log(1−ε)] + σ(−βδ)[logσ(−βδ) − log ε].

    ε must be > 0; with label_smoothing = 0 we use ε = 1e-3 as the paper recommends (TRL requires the user to set
    it). Returns: loss (B,), {}.
    """
    epsilon = label_smoothing or 1e-3
    z = beta * (chosen_scores - rejected_scores)
    loss = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-epsilon))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(epsilon)))
    return loss, {}


def nca_pair(*, chosen_scores, rejected_scores, beta, **_) -> tuple[Tensor, Metrics]:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment", Eq. 11 with K = 1):
    −logσ(βS_w) − ½logσ(−βS_w) − ½logσ(−βS_l). Returns: loss (B,), {}.
    """
    chosen, rejected = beta * chosen_scores, beta * rejected_scores
    loss = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return loss, {}


def robust(*, chosen_scores, rejected_scores, beta, label_smoothing=0.0, **_) -> tuple[Tensor, Metrics]:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8), ε = label-flip probability in [0, 0.5):
    [−(1−ε)logσ(βδ) + ε·logσ(−βδ)] / (1 − 2ε), an unbiased estimate of the clean-label DPO loss.
    Returns: loss (B,), {}.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}.")
    z = beta * (chosen_scores - rejected_scores)
    loss = (-(1.0 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z))
    return loss / (1.0 - 2.0 * label_smoothing), {}


def bco_pair(*, chosen_scores, rejected_scores, beta, **_) -> tuple[Tensor, Metrics]:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization", Eq. 5 without the running-mean shift
    δ̄ that `BCOTrainer` uses): −logσ(βS_w) − logσ(−βS_l). Returns: loss (B,), {}.
    """
    return -F.logsigmoid(beta * chosen_scores) - F.logsigmoid(-beta * rejected_scores), {}


def sppo_hard(*, chosen_scores, rejected_scores, beta, **_) -> tuple[Tensor, Metrics]:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7 with P̂(y_w ≻ ·) = 1,
    P̂(y_l ≻ ·) = 0, η = β⁻¹): (S_w − 1/(2β))² + (S_l + 1/(2β))². Returns: loss (B,), {}.
    """
    half_inverse = 1.0 / (2.0 * beta)
    return (chosen_scores - half_inverse) ** 2 + (rejected_scores + half_inverse) ** 2, {}


def aot(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
        label_smoothing=0.0, **_) -> tuple[Tensor, Metrics]:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    Eq. 10): sort over the batch, separately, u = ℓθ(y_w) − ℓθ(y_l) and v = ℓref(y_w) − ℓref(y_l); with
    d = sort(u) − sort(v) (a first-order stochastic-dominance check on the 1-D quantiles), the ε-smoothed logistic
    −(1−ε)logσ(βd) − ε·logσ(−βd). Uses raw log-probs, not f-divergence scores. Entry i of the result belongs to
    the i-th quantile, not to pair i, so per-pair weights (WPO) are meaningless here. Returns: loss (B,), {}.
    """
    policy_margin = torch.sort(policy_chosen_logps - policy_rejected_logps).values
    ref_margin = torch.sort(ref_chosen_logps - ref_rejected_logps).values
    return _smoothed_logistic(beta * (policy_margin - ref_margin), label_smoothing), {}


def aot_unpaired(*, chosen_logratios, rejected_logratios, beta, label_smoothing=0.0, **_) -> tuple[Tensor, Metrics]:
    """AOT, unpaired (Melnyk et al. 2024, Eq. 9): d = sort(Δ_w) − sort(Δ_l) over the batch, then the ε-smoothed
    logistic −(1−ε)logσ(βd) − ε·logσ(−βd). Entries are quantiles, not pairs. Returns: loss (B,), {}.
    """
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    return _smoothed_logistic(beta * delta, label_smoothing), {}


def apo_zero(*, chosen_logratios, rejected_logratios, beta, **_) -> tuple[Tensor, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 6): raise chosen, lower
    rejected likelihood: (1 − σ(βΔ_w)) + σ(βΔ_l), on raw log-ratios (no f-divergence). Returns: loss (B,), {}.
    """
    return (1.0 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios), {}


def apo_down(*, chosen_scores, rejected_scores, chosen_logratios, beta, **_) -> tuple[Tensor, Metrics]:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 7): lower the chosen likelihood, the rejected more:
    σ(βΔ_w) + (1 − σ(βδ)). Returns: loss (B,), {}.
    """
    loss = torch.sigmoid(beta * chosen_logratios) + (1.0 - torch.sigmoid(beta * (chosen_scores - rejected_scores)))
    return loss, {}


def discopop(*, chosen_scores, rejected_scores, beta, discopop_tau=0.05, **_) -> tuple[Tensor, Metrics]:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for LLMs", Eq. 5): z = βδ, g = σ(z/τ); (1 − g)·(−logσ(z)) + g·exp(−z), blending the logistic (DPO)
    and exponential losses. Not monotone: near z = 0 (about −2.4τ < z < 1.5τ) the steep blend makes the loss rise
    with z, as the paper notes for this non-convex objective; away from it descending the loss raises δ.
    Returns: loss (B,), {"discopop_mix": mean g}.
    """
    z = beta * (chosen_scores - rejected_scores)
    mix = torch.sigmoid(z / discopop_tau)
    loss = (1.0 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
    return loss, {"discopop_mix": mix.detach().mean()}


def sft(*, policy_chosen_logps, chosen_lengths, chosen_length_mean=None, **_) -> tuple[Tensor, Metrics]:
    """NLL on the chosen completions, for RPO/MPO-style mixtures (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", Eq. 1 NLL term): loss_i = −ℓθ(y_w,i) / mean_j n(y_w,j).

    The division by the batch's mean length (not each pair's own length) makes mean_i loss_i = Σ_i(−ℓ_i) / Σ_i n_i,
    the token-mean cross-entropy TRL uses, while keeping one entry per pair so it adds to the other losses. The
    token mean is over this (micro-)batch, as in TRL; `chosen_length_mean` gives that micro-batch's mean when these
    pairs are a slice of it (`max_tokens_per_backward`). Returns: loss (B,), {"nll_loss": token-mean NLL}.
    """
    lengths = chosen_lengths.to(policy_chosen_logps.dtype)
    mean = lengths.mean() if chosen_length_mean is None else chosen_length_mean.to(lengths)
    loss = -policy_chosen_logps / mean.clamp(min=1.0)
    return loss, {"nll_loss": loss.detach().mean()}


def sigmoid_norm(*, chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta,
                 **_) -> tuple[Tensor, Metrics]:
    """Length-normalised DPO (SimPO-style averaging, Meng et al. 2024, but still reference-anchored):
    −logσ(β(S_w/n_w − S_l/n_l)). Returns: loss (B,), {}.
    """
    delta = chosen_scores / chosen_lengths - rejected_scores / rejected_lengths
    return -F.logsigmoid(beta * delta), {}


DPO_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop, "sft": sft, "sigmoid_norm": sigmoid_norm,
}


# ---- sequence-level pieces -----------------------------------------------------------------------------------


def ld_sequence_logps(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                      rejected_mask: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO length desensitisation (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    Eq. 9): with s = min(n_w, n_l) per pair, ℓ(y) = Σ_{t≤s} log p_t + α·Σ_{t>s} log p_t, where t counts masked
    (completion) tokens only, so completions may start at different offsets in each row. α = 1 gives plain sums;
    α = 0 truncates both completions to the shorter one. Apply to policy and reference alike.

    Args: *_token_logps (B, T) token log-probs (values at unmasked positions are ignored, even inf/nan);
    *_mask (B, T) 0/1 or bool, 1 = completion token; alpha float. Returns: (chosen (B,), rejected (B,)).
    """
    chosen_mask, rejected_mask = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)  # s, (B, 1)

    def weighted_sum(logps: Tensor, mask: Tensor) -> Tensor:
        position = mask.long().cumsum(-1)  # 1-based rank among masked tokens
        weight = torch.where(position <= shared, 1.0, alpha).to(logps.dtype)
        return torch.where(mask, logps * weight, torch.zeros_like(logps)).sum(-1)

    return weighted_sum(chosen_token_logps, chosen_mask), weighted_sum(rejected_token_logps, rejected_mask)


@torch.no_grad()
def wpo_weights(token_logps: Tensor, token_log_sum_p2: Tensor, mask: Tensor) -> Tensor:
    """WPO sequence weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 8,
    the sampled-alignment form): w(y) = exp(mean_t [log p_t − log Σ_v p_v²]) over the completion tokens, without
    gradient. Σ_v p_v² is the probability that the policy samples the same token twice, so the weight is the
    geometric-mean ratio of the token's probability to the policy's "self-agreement"; it is ≈ 1 for on-policy data.
    The pair weight is w(y_w)·w(y_l); the trainer multiplies the per-pair loss by it.

    Args: token_logps (B, T); token_log_sum_p2 (B, T) = log Σ_v p_v² per position (logsumexp(2z) − 2·logsumexp(z)
    on the logits z); mask (B, T) 0/1 or bool. Returns: w (B,), detached (1 for a row with no completion tokens).
    """
    mask = mask.bool()
    per_token = torch.where(mask, token_logps - token_log_sum_p2, torch.zeros_like(token_logps))
    count = mask.sum(-1).clamp(min=1).to(per_token.dtype)
    return torch.exp(per_token.sum(-1) / count)
