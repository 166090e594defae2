"""The one place where logits become log-probabilities.

Lives here: which positions of a causal-LM batch carry a target, a forward pass that runs the LM head only on
the N trained rows (`forward_target_rows`), and one fused pass from (N, V) logits to per-token log-probs, entropy,
mean logit and token accuracy with a two-pass backward (`token_logps`) — float temporaries are made 128 rows at a
time, and passes without gradients apply the head chunk by chunk so their full logits never exist.

Not here: losses (`losses/`), masks built from data (`data/`).

Why the head runs only on target positions: for small models the LM head is most of the compute (68% of FLOPs on
the 12M-param built-in benchmark model), and prompts/padding carry no loss. benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import functools
import inspect

import torch

IGNORE_INDEX = -100


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict a trained token labels[:, t+1] in at least one row.

    Args: labels (B, T) with IGNORE_INDEX where nothing is trained. Returns: (K,) long indices into [0, T-1).
    """
    trained = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return trained.nonzero(as_tuple=True)[0]


@functools.lru_cache(maxsize=64)
def _forward_accepts_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/PEFT wrappers (for signature checks only; calls go through the wrapper)."""
    while True:
        inner = getattr(model, "module", None) or getattr(getattr(model, "base_model", None), "model", None)
        if inner is None or inner is model:
            return model
        model = inner


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head module when logits are exactly head(final hidden states); None when the model post-processes
    them (Gemma-2 soft-capping, Cohere's logit scale) or has no separate head — those take the slower path."""
    base = _base_model(model)
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    config = getattr(base, "config", None)
    if head is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def forward_target_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          **model_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Forward a causal LM and return the logits of trained targets only.

    Args: input_ids, labels (B, T) (labels in the Hugging Face convention: labels[t] is predicted at t-1);
    attention_mask (B, T) or None; position_ids (B, T) or None (padding-free/packed rows); model_kwargs go to the
    forward call as they are (e.g. PPO's policy-and-value container takes `with_values=True`).
    Returns: logits (N, V) of the N trained targets, targets (N,), valid (B, K) — where the N targets sit among
    the K kept positions of each row (row-major, so per-row sums are a scatter of the N values) — and the output.
    """
    hidden, head, logits, targets, valid, output = forward_target_rows(model, input_ids, labels, attention_mask,
                                                                       position_ids, **model_kwargs)
    return (head(hidden) if logits is None else logits), targets, valid, output


def forward_target_rows(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                        **model_kwargs):
    """`forward_target_logits` that may stop before the LM head: returns (hidden (N, H), head, None, targets,
    valid, output) when the head can run apart from the model, else (None, None, logits (N, V), targets, valid,
    output).

    The LM head runs on the N trained positions only: a forward pre-hook on the head takes the final hidden states
    and hands the head an empty slice; the caller applies the head to the N selected rows (all at once, or chunk by
    chunk without gradients). Keeping the union of trained positions with `logits_to_keep` is not enough: with
    prompts of different lengths that union is nearly every position. Models whose logits are not head(hidden)
    fall back to `logits_to_keep` / slicing.
    `use_cache=False` is forced: with a KV cache transformers does not detect packed rows from position_ids and
    packed documents would attend to each other.
    """
    keep = target_positions(labels)
    targets = labels[:, keep + 1]
    valid = targets != IGNORE_INDEX
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **model_kwargs)
    head = output_head(model)
    if head is not None:
        captured: list[torch.Tensor] = []

        def take_hidden(module, args):
            captured.append(args[0])
            return (args[0][..., :0, :],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(take_hidden)
        try:
            output = model(**kwargs)
        finally:
            handle.remove()
        if len(captured) == 1 and captured[0].dim() == 3 and captured[0].shape[1] == input_ids.shape[1]:
            return captured[0][:, keep][valid], head, None, targets[valid], valid, output
        # the head ran more than once or on a slice we did not expect: recompute the ordinary way
    if _forward_accepts_logits_to_keep(type(_base_model(model))):
        output = model(**kwargs, logits_to_keep=keep)
        logits = output.logits
    else:
        output = model(**kwargs)
        logits = output.logits[:, keep]
    return None, None, logits[valid], targets[valid], valid, output


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_log_sum_p2: bool = False, with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probs of each row's trained tokens (completions), laid out per row.

    Args: batch with input_ids, labels (R, T), optional attention_mask/position_ids.
    Returns: {"logps": (R, K) log-probs (0 where not trained), "mask": (R, K) bool, "logits_mean": (N,) mean raw
    logit over the vocabulary per trained token (detached, for the logits/* metrics), "log_sum_p2": (R, K)
    log Σ_v p_v² when asked (WPO), "entropy": (N,) entropy at `temperature` when asked (detached),
    "correct": (N,) bool target == argmax, "targets": (N,)}. The (N, V) logits are not returned: once the fused
    log-softmax has run nothing holds them, so they are freed before the backward (without gradients the head runs
    chunk by chunk and they never exist at all).
    """
    hidden, head, logits, targets, valid, _ = forward_target_rows(model, batch["input_ids"], batch["labels"],
                                                                  batch.get("attention_mask"),
                                                                  batch.get("position_ids"))
    if logits is None and (torch.is_grad_enabled() or with_log_sum_p2):
        logits = head(hidden)
    stats = token_logps(logits, targets, temperature, with_entropy=with_entropy, hidden=hidden, head=head)
    flat = stats["logps"]
    logps = flat.new_zeros(valid.shape).masked_scatter(valid, flat)
    out = {"logps": logps, "mask": valid, "logits_mean": stats["logits_mean"], "correct": stats["correct"],
           "targets": targets}
    if with_entropy:
        out["entropy"] = stats["entropy"]
    if with_log_sum_p2:
        with torch.no_grad():
            z = logits.detach().float() / temperature
            lsp2 = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            out["log_sum_p2"] = flat.new_zeros(valid.shape).masked_scatter(valid, lsp2)
    return out


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                 probs_out: torch.Tensor | None = None):
    """One chunk: (log-prob of target, entropy or None, mean raw logit, target is the argmax); the softmax is
    written to probs_out if given."""
    z = logits.float()
    mean = z.mean(-1)
    correct = z.argmax(-1) == targets
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logp = (z.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
    entropy = None
    if probs_out is not None or with_entropy:
        p = torch.sub(z, lse, out=probs_out) if probs_out is not None else z - lse
        p.exp_()
        if with_entropy:  # H = log Z − Σ p·z, as a batched dot product (no (n, V) temporary)
            entropy = lse.squeeze(-1) - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return logp, entropy, mean, correct


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[target] that keeps the softmax for its backward: grad_z = g · (onehot − p) / T.

    Against autograd through logsumexp + gather this drops the backward from about seven passes over the (N, V)
    logits (softmax recompute, zero-fill and scatter of the gather gradient, their sum) to two, and the entropy
    metric reuses the same softmax. The logits themselves are not saved: the head's matmul backward needs only
    hidden states and weights, so they can be freed once the forward is done.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, with_entropy: bool, chunk_size: int):
        n = logits.shape[0]
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        logps = torch.empty(n, dtype=torch.float32, device=logits.device)
        means = torch.empty_like(logps)
        correct = torch.empty(n, dtype=torch.bool, device=logits.device)
        entropy = torch.empty_like(logps) if with_entropy else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logp, ent, mean, hit = _chunk_stats(logits[start:end], targets[start:end], temperature, with_entropy,
                                                probs_out=probs[start:end])
            logps[start:end], means[start:end], correct[start:end] = logp, mean, hit
            if with_entropy:
                entropy[start:end] = ent
        ctx.save_for_backward(probs, targets)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        if entropy is None:
            entropy = logps.new_zeros(0)
        ctx.mark_non_differentiable(entropy, means, correct)
        return logps, entropy, means, correct

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, grad_means, grad_correct):
        probs, targets = ctx.saved_tensors
        grad = probs * grad_logps.neg().unsqueeze(-1)
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None, None


CHUNK_ROWS = 128  # rows of (rows, V) float temporaries: ≤16 MiB at V=32k, so the allocator reuses them


def token_logps(logits: torch.Tensor | None, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, chunk_size: int = CHUNK_ROWS, hidden: torch.Tensor | None = None,
                head: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """log softmax(logits / temperature)[target] per row, plus the per-row statistics the trainers log.

    Args: logits (N, V), targets (N,) — or, without gradients, hidden (N, H) and the LM head instead of logits,
    so that only one chunk of logits exists at a time. Returns {"logps": (N,) float32 (differentiable when logits
    are), "logits_mean": (N,) mean raw logit, "correct": (N,) bool target == argmax, "entropy": (N,) entropy of
    softmax(logits / temperature) when asked}. Without gradients (reference and old-policy passes) it works
    chunk by chunk and keeps nothing.
    """
    if logits is not None and logits.requires_grad and torch.is_grad_enabled():
        logps, entropy, means, correct = _SelectiveLogSoftmax.apply(logits, targets, temperature, with_entropy,
                                                                    chunk_size)
        out = {"logps": logps, "logits_mean": means, "correct": correct}
        if with_entropy:
            out["entropy"] = entropy
        return out
    rows = logits.shape[0] if logits is not None else hidden.shape[0]
    parts = []
    with torch.no_grad():
        for s in range(0, rows, chunk_size):
            chunk = logits[s:s + chunk_size] if logits is not None else head(hidden[s:s + chunk_size])
            parts.append(_chunk_stats(chunk, targets[s:s + chunk_size], temperature, with_entropy))
    empty = targets.new_zeros(0, dtype=torch.float32)
    out = {"logps": torch.cat([p[0] for p in parts]) if parts else empty,
           "logits_mean": torch.cat([p[2] for p in parts]) if parts else empty,
           "correct": torch.cat([p[3] for p in parts]) if parts else empty.bool()}
    if with_entropy:
        out["entropy"] = torch.cat([p[1] for p in parts]) if parts else empty
    return out


def selective_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row.

    Args: logits (N, V), targets (N,). Returns: (N,) float32 log-probs (differentiable).
    """
    return token_logps(logits, targets, temperature, chunk_size=chunk_size)["logps"]
