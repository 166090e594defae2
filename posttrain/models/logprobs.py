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
                     with_log_sum_p2: bool = False, with_entropy: bool = False,
                     with_metrics: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probs of each row's trained tokens (completions), laid out per row.

    Args: batch with input_ids, labels (R, T), optional attention_mask/position_ids.
    Returns: {"logps": (R, K) log-probs (0 where not trained), "mask": (R, K) bool, "targets": (N,)}, plus
    "log_sum_p2": (R, K) log Σ_v p_v² when asked (WPO), "entropy": (N,) entropy at `temperature` when asked, and
    with `with_metrics` "logits_mean": (N,) mean raw logit per trained token (for the logits/* metrics) and
    "correct": (N,) bool target == argmax (all detached). The (N, V) logits are not returned: once the fused
    log-softmax has run nothing holds them, so they are freed before the backward (without gradients the head runs
    chunk by chunk and they never exist at all).
    """
    hidden, head, logits, targets, valid, _ = forward_target_rows(model, batch["input_ids"], batch["labels"],
                                                                  batch.get("attention_mask"),
                                                                  batch.get("position_ids"))
    if logits is None and (torch.is_grad_enabled() or with_log_sum_p2):
        logits = head(hidden)
    stats = token_logps(logits, targets, temperature, with_entropy=with_entropy, with_metrics=with_metrics,
                        hidden=hidden, head=head)
    flat = stats.pop("logps")
    logps = flat.new_zeros(valid.shape).masked_scatter(valid, flat)
    out = {"logps": logps, "mask": valid, "targets": targets, **stats}
    if with_log_sum_p2:
        with torch.no_grad():
            z = logits.detach().float() / temperature
            lsp2 = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            out["log_sum_p2"] = flat.new_zeros(valid.shape).masked_scatter(valid, lsp2)
    return out


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                 with_metrics: bool, probs_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One chunk: log-prob of each target, and when asked its entropy, mean raw logit and whether the target is the
    argmax; the softmax is written to probs_out if given."""
    z = logits.float()
    out = {}
    if with_metrics:
        out["logits_mean"], out["correct"] = z.mean(-1), z.argmax(-1) == targets
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    out["logps"] = (z.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
    if probs_out is not None or with_entropy:
        p = torch.sub(z, lse, out=probs_out) if probs_out is not None else z - lse
        p.exp_()
        if with_entropy:  # H = log Z − Σ p·z, as a batched dot product (no (n, V) temporary)
            out["entropy"] = lse.squeeze(-1) - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return out


def _chunked_stats(chunk_logits, targets: torch.Tensor, temperature: float, with_entropy: bool, with_metrics: bool,
                   chunk_size: int, probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`_chunk_stats` over rows [start, end) at a time; chunk_logits(start, end) gives those rows' logits."""
    n, device = targets.shape[0], targets.device
    out = {"logps": torch.empty(n, dtype=torch.float32, device=device)}
    if with_entropy:
        out["entropy"] = torch.empty(n, dtype=torch.float32, device=device)
    if with_metrics:
        out["logits_mean"] = torch.empty(n, dtype=torch.float32, device=device)
        out["correct"] = torch.empty(n, dtype=torch.bool, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        stats = _chunk_stats(chunk_logits(start, end), targets[start:end], temperature, with_entropy, with_metrics,
                             probs_out=None if probs is None else probs[start:end])
        for key, value in stats.items():
            out[key][start:end] = value
    return out


_STAT_KEYS = ("entropy", "logits_mean", "correct")  # the statistics besides logps, in the autograd outputs' order


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[target] that keeps the softmax for its backward: grad_z = g · (onehot − p) / T.

    Against autograd through logsumexp + gather this drops the backward from about seven passes over the (N, V)
    logits (softmax recompute, zero-fill and scatter of the gather gradient, their sum) to two, and the entropy
    metric reuses the same softmax. The logits themselves are not saved: the head's matmul backward needs only
    hidden states and weights, so they can be freed once the forward is done.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, with_entropy: bool, with_metrics: bool, chunk_size: int):
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        out = _chunked_stats(lambda start, end: logits[start:end], targets, temperature, with_entropy, with_metrics,
                             chunk_size, probs=probs)
        ctx.save_for_backward(probs, targets)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        extras = [out.get(key, out["logps"].new_zeros(0)) for key in _STAT_KEYS]  # autograd wants tensors
        ctx.mark_non_differentiable(*extras)
        return (out["logps"], *extras)

    @staticmethod
    def backward(ctx, grad_logps, *unused):
        probs, targets = ctx.saved_tensors
        grad = probs * grad_logps.neg().unsqueeze(-1)
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None, None, None


CHUNK_ROWS = 128  # rows of (rows, V) float temporaries: ≤16 MiB at V=32k, so the allocator reuses them


def token_logps(logits: torch.Tensor | None, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, with_metrics: bool = False, chunk_size: int = CHUNK_ROWS,
                hidden: torch.Tensor | None = None, head: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """log softmax(logits / temperature)[target] per row, plus the per-row statistics the trainers log.

    Args: logits (N, V), targets (N,) — or, without gradients, hidden (N, H) and the LM head instead of logits,
    so that only one chunk of logits exists at a time. Returns {"logps": (N,) float32 (differentiable when logits
    are)}, with "entropy": (N,) entropy of softmax(logits / temperature) when `with_entropy`, and "logits_mean":
    (N,) mean raw logit and "correct": (N,) bool target == argmax when `with_metrics` (reference and old-policy
    passes ask for neither). Without gradients it works chunk by chunk and keeps nothing.
    """
    if logits is not None and logits.requires_grad and torch.is_grad_enabled():
        logps, *extras = _SelectiveLogSoftmax.apply(logits, targets, temperature, with_entropy, with_metrics,
                                                    chunk_size)
        wanted = {"entropy": with_entropy, "logits_mean": with_metrics, "correct": with_metrics}
        return {"logps": logps, **{key: value for key, value in zip(_STAT_KEYS, extras) if wanted[key]}}
    with torch.no_grad():
        return _chunked_stats(lambda start, end: logits[start:end] if logits is not None else head(hidden[start:end]),
                              targets, temperature, with_entropy, with_metrics, chunk_size)


def selective_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row.

    Args: logits (N, V), targets (N,). Returns: (N,) float32 log-probs (differentiable).
    """
    return token_logps(logits, targets, temperature, chunk_size=chunk_size)["logps"]
