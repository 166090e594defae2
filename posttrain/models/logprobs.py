"""The one place where logits become log-probabilities.

Lives here: which positions of a causal-LM batch carry a target, a forward pass that runs the LM head only on
the N trained rows (`forward_target_rows`), and one fused pass from (N, V) logits to per-token log-probs, entropy,
mean logit and token accuracy with a two-pass backward (`token_logps`) — float temporaries are made 128 rows at a
time, and passes without gradients apply the head chunk by chunk so their full logits never exist. Passes with
gradients do the same on long batches (`chunked_lm_head`): each chunk of head + log-softmax (≤ 1,024 rows and
≤ 256 MiB of float32 logits + softmax) runs under activation checkpointing, so training memory no longer grows with
N·V. Rows that repeat a prompt run it once (`shared_prefix`, `models/shared_prefix.py`).
Under ZeRO-3 and FSDP every forward is a collective (`models/sharding.py`): the shared prefix is off there (it
runs the model once or twice as the data decides), ZeRO-3 head chunks are counted from the most rows any process
holds, and an FSDP2 head runs inside the model's forward (logits kept for the trained positions only).

Not here: losses (`losses/`), masks built from data (`data/`).

Why the head runs only on target positions: for small models the LM head is most of the compute (68% of FLOPs on
the 12M-param built-in benchmark model), and prompts/padding carry no loss. benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.errors import UserError
from posttrain.models.sharding import collective_forwards, max_over_processes
from posttrain.models.shared_prefix import forward_shared_prefix

IGNORE_INDEX = -100


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that follow the attention mask (0 for pad columns), so left-padded prompts see the
    positions generation gave them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(labels (B, P + C): the trained completion tokens, IGNORE_INDEX on the prompt and where completion_mask is 0;
    the prompt length P) of a rollout batch whose last C columns are the completions."""
    prompt_len = input_ids.shape[1] - completion_mask.shape[1]
    labels = input_ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    labels[:, prompt_len:][completion_mask == 0] = IGNORE_INDEX
    return labels, prompt_len


def batch_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's `labels`; for a batch in TRL's form (`completion_mask`, 1 on the trained completion tokens, and no
    labels: TRL's preference collators) the input ids there, IGNORE_INDEX elsewhere."""
    if batch.get("labels") is not None:
        return batch["labels"]
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


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
    if _is_fsdp2(head):
        return None  # an FSDP2 head called outside its model's forward crashes the backward (torch 2.13, gloo)
    return head


def _is_fsdp2(module: torch.nn.Module) -> bool:
    """Whether `module` is sharded by FSDP2 (`fully_shard`): it is an FSDPModule or holds DTensor parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(module, FSDPModule) or any(isinstance(p, DTensor) for p in module.parameters())


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


def _pack_instead(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, prefix: int, model_kwargs: dict) -> bool:
    """Whether to run the batch as one packed row (`pack_rows`): the model runs the packed attention, the batch
    has padding, and dropping the padding saves more tokens than running the shared prefix once would."""
    from posttrain.models.packed_attention import NAME

    config = getattr(_base_model(model), "config", None)
    if (model_kwargs or attention_mask is None or attention_mask.dim() != 2 or input_ids.shape[0] < 2
            or getattr(config, "_attn_implementation", None) != NAME or collective_forwards(model)
            or (position_ids is not None and position_ids.dim() != 2)):
        return False
    pads = int(attention_mask.numel() - attention_mask.sum())
    if pads == 0:
        return False
    if prefix > 0:
        key = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)], dim=1)
        shared = (input_ids.shape[0] - torch.unique(key, dim=0).shape[0]) * prefix
        return pads > shared
    return True


def _packed_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None) -> tuple[object, torch.Tensor]:
    """Run the real tokens of a padded (B, T) batch as one row (1, S) whose positions restart per row (the
    packed attention gives each row its own causal attention). Returns the output and (B, T) → packed index."""
    real = attention_mask.bool()
    positions = positions_from_mask(attention_mask) if position_ids is None else position_ids
    output = model(input_ids=input_ids[real][None], position_ids=positions[real][None], use_cache=False)
    return output, real.reshape(-1).long().cumsum(0).sub_(1).view_as(real)


def forward_target_rows(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                        shared_prefix: int = 0, pack_rows: bool = False, **model_kwargs):
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
    `shared_prefix` > 0 (left-padded prompts followed by completions, e.g. a GRPO group): rows whose first
    columns — up to `shared_prefix` and before the first trained target — are equal run them once
    (`models/shared_prefix.py`); the results are those of the plain forward.
    `pack_rows` (callers that use only the returned hidden states): a padded batch runs as one packed row
    without its padding when the model runs the packed attention (`models/packed_attention.py`) and that saves
    more than the shared prefix; the output then covers the packed row.
    """
    keep = target_positions(labels)
    targets = labels[:, keep + 1]
    if shared_prefix and collective_forwards(model):
        shared_prefix = 0  # it runs the model once or twice as the data decides; ZeRO-3/FSDP need equal counts
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
        prefix = min(shared_prefix, int(keep[0])) if keep.numel() else 0
        packed = (pack_rows and keep.numel() > 0
                  and _pack_instead(model, input_ids, attention_mask, position_ids, prefix, model_kwargs)
                  and bool(attention_mask[:, keep][valid].all()))  # every target is predicted by a real token
        try:
            output = None
            if packed:
                output, index = _packed_forward(model, input_ids, attention_mask, position_ids)
                if len(captured) == 1 and captured[0].shape[:2] == (1, int(index.max()) + 1):
                    return captured[0][0, index[:, keep][valid]], head, None, targets[valid], valid, output
                captured.clear()  # the head ran otherwise than expected: run the plain forward instead
                prefix, output = 0, None
            elif prefix > 0:
                positions = position_ids
                if positions is None and attention_mask is not None:
                    positions = positions_from_mask(attention_mask)
                output = forward_shared_prefix(model, input_ids, attention_mask, positions, prefix, **model_kwargs)
            if output is None:
                captured.clear()
                prefix, output = 0, model(**kwargs)
        finally:
            handle.remove()
        hidden = captured[-1] if captured else None
        if (len(captured) == (2 if prefix else 1) and hidden.dim() == 3
                and hidden.shape[1] == input_ids.shape[1] - prefix):
            return hidden[:, keep - prefix][valid], head, None, targets[valid], valid, output
        # the head ran more than once or on a slice we did not expect: recompute the ordinary way
    if _forward_accepts_logits_to_keep(type(_base_model(model))):
        output = model(**kwargs, logits_to_keep=keep)
        logits = output.logits
    else:
        output = model(**kwargs)
        logits = output.logits[:, keep]
    return None, None, logits[valid], targets[valid], valid, output


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_log_sum_p2: bool = False, with_entropy: bool = False, with_metrics: bool = False,
                     chunked_lm_head: str | bool | None = None, shared_prefix: int = 0,
                     pack_rows: bool = True, **model_kwargs) -> dict[str, torch.Tensor]:
    """Per-token log-probs of each row's trained tokens (completions), laid out per row.

    Args: batch with input_ids, labels (R, T) (or TRL's completion_mask: `batch_labels`), optional
    attention_mask/position_ids; `chunked_lm_head` as in
    `token_logps`; `shared_prefix` and `pack_rows` as in `forward_target_rows` (equal prompts run once, padded
    rows may run as one packed row); `model_kwargs`: more inputs of the forward (PPO's `with_values`).
    Returns: {"logps": (R, K) log-probs (0 where not trained), "mask": (R, K) bool, "targets": (N,)} (and "output",
    the model's output, with `model_kwargs`), plus
    "log_sum_p2": (R, K) log Σ_v p_v² when asked (WPO), "entropy": (N,) entropy at `temperature` when asked, and
    with `with_metrics` "logits_mean": (N,) mean raw logit per trained token (for the logits/* metrics) and
    "correct": (N,) bool target == argmax (all detached). The (N, V) logits are not returned: once the fused
    log-softmax has run nothing holds them, so they are freed before the backward (without gradients, or with
    the chunked head, the head runs chunk by chunk and they never exist at all).
    """
    from posttrain.models.vision import image_inputs

    images = image_inputs(batch)  # a VLM batch: the images go in, and the prompt is not shared (models/vision.py)
    # M-RoPE models (Qwen2-VL) compute their own 3-D positions from the attention mask and the image grid
    positions = None if "mm_token_type_ids" in images else batch.get("position_ids")
    hidden, head, logits, targets, valid, output = forward_target_rows(model, batch["input_ids"], batch_labels(batch),
                                                                       batch.get("attention_mask"), positions,
                                                                       0 if images else shared_prefix,
                                                                       pack_rows=pack_rows, **images, **model_kwargs)
    stats = token_logps(logits, targets, temperature, with_entropy=with_entropy, with_metrics=with_metrics,
                        with_log_sum_p2=with_log_sum_p2, hidden=hidden, head=head, chunked_lm_head=chunked_lm_head)
    flat = stats.pop("logps")
    out = {"logps": flat.new_zeros(valid.shape).masked_scatter(valid, flat), "mask": valid, "targets": targets,
           **({"output": output} if model_kwargs else {})}  # else nothing holds the output (and its logits)
    if with_log_sum_p2:
        out["log_sum_p2"] = flat.new_zeros(valid.shape).masked_scatter(valid, stats.pop("log_sum_p2"))
    return {**out, **stats}


# The statistics besides logps, in the order the autograd functions return them; "metrics" asks for two of them.
_STAT_KEYS = ("entropy", "logits_mean", "correct", "log_sum_p2")


def _stat_keys(with_entropy: bool, with_metrics: bool, with_log_sum_p2: bool) -> tuple[str, ...]:
    wanted = {"entropy": with_entropy, "logits_mean": with_metrics, "correct": with_metrics,
              "log_sum_p2": with_log_sum_p2}
    return tuple(key for key in _STAT_KEYS if wanted[key])


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, keys: tuple[str, ...],
                 probs_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One chunk: log-prob of each target, and the statistics named in `keys` (entropy, mean raw logit, whether
    the target is the argmax, log Σ p²); the softmax is written to probs_out if given."""
    z = logits.float()
    out = {}
    if "logits_mean" in keys:
        out["logits_mean"], out["correct"] = z.mean(-1), z.argmax(-1) == targets
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    out["logps"] = (z.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
    if "log_sum_p2" in keys:  # log Σ p² = logsumexp(2z) − 2·logsumexp(z) (WPO's weights)
        out["log_sum_p2"] = torch.logsumexp(2 * z, -1) - 2 * lse.squeeze(-1)
    if probs_out is not None or "entropy" in keys:
        p = torch.sub(z, lse, out=probs_out) if probs_out is not None else z - lse
        p.exp_()
        if "entropy" in keys:  # H = log Z − Σ p·z, as a batched dot product (no (n, V) temporary)
            out["entropy"] = lse.squeeze(-1) - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return out


def _chunked_stats(chunk_logits, targets: torch.Tensor, temperature: float, keys: tuple[str, ...],
                   chunk_size: int, probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`_chunk_stats` over rows [start, end) at a time; chunk_logits(start, end) gives those rows' logits."""
    n, device = targets.shape[0], targets.device
    out = {key: torch.empty(n, dtype=torch.bool if key == "correct" else torch.float32, device=device)
           for key in ("logps", *keys)}
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        stats = _chunk_stats(chunk_logits(start, end), targets[start:end], temperature, keys,
                             probs_out=None if probs is None else probs[start:end])
        for key, value in stats.items():
            out[key][start:end] = value
    return out


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[target] that keeps the softmax for its backward: grad_z = g · (onehot − p) / T.

    Against autograd through logsumexp + gather this drops the backward from about seven passes over the (N, V)
    logits (softmax recompute, zero-fill and scatter of the gather gradient, their sum) to two, and the entropy
    metric reuses the same softmax. The logits themselves are not saved: the head's matmul backward needs only
    hidden states and weights, so they can be freed once the forward is done.
    Returns (logps, *the statistics named in keys); of the statistics only the entropy is differentiable
    (∂H/∂z_j = −p_j·(log p_j + H), for GRPO's entropy bonus), the others not.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, keys: tuple[str, ...], chunk_size: int):
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        out = _chunked_stats(lambda start, end: logits[start:end], targets, temperature, keys, chunk_size,
                             probs=probs)
        entropy = out.get("entropy", probs.new_zeros(0))
        ctx.save_for_backward(probs, targets, entropy)
        ctx.temperature, ctx.logits_dtype, ctx.keys = temperature, logits.dtype, keys
        extras = [out[key] for key in keys]
        ctx.mark_non_differentiable(*[out[key] for key in keys if key != "entropy"])
        return (out["logps"], *extras)

    @staticmethod
    def backward(ctx, grad_logps, *grad_extras):
        probs, targets, entropy = ctx.saved_tensors
        grad = probs * grad_logps.neg().unsqueeze(-1)
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
        grad_entropy = dict(zip(ctx.keys, grad_extras)).get("entropy")
        if grad_entropy is not None:  # the entropy bonus: ∂H/∂z_j = −p_j·(log p_j + H)
            g = grad_entropy.unsqueeze(-1)
            grad.sub_(g * (torch.xlogy(probs, probs) + probs * entropy.unsqueeze(-1)))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None, None


CHUNK_ROWS = 128  # rows of (rows, V) float temporaries: ≤16 MiB at V=32k, so the allocator reuses them

# The chunked head of passes with gradients: rows and bytes per checkpointed chunk, and the size of the full (N, V)
# float32 softmax above which "auto" turns it on.
HEAD_CHUNK_ROWS = 1024  # at most; fewer for large vocabularies so a chunk's logits + softmax stay ≤ HEAD_CHUNK_BYTES
HEAD_CHUNK_BYTES = 256 << 20
HEAD_CHUNK_AUTO_BYTES = 1 << 30


def head_chunk_rows(head: torch.nn.Module) -> int:
    """Rows per chunk of the chunked head: HEAD_CHUNK_ROWS, or fewer so that one chunk's float32 logits and softmax
    (rows · V · 8 bytes) fit in HEAD_CHUNK_BYTES — 1,024 rows at V = 32k, 256 at 128k — which keeps the pass's
    memory the same whatever the vocabulary size."""
    vocab = _vocab_size(head) or 1
    return min(HEAD_CHUNK_ROWS, max(16, HEAD_CHUNK_BYTES // (vocab * 8)))

# "auto" | True | False ("true"/"false" too) for calls that pass chunked_lm_head=None; trainers set it from their
# config for the duration of each compute_loss (`lm_head_chunking`).
_CHUNKED_LM_HEAD: contextvars.ContextVar[str | bool] = contextvars.ContextVar("chunked_lm_head", default="auto")


@contextlib.contextmanager
def lm_head_chunking(setting: str | bool):
    """Within the block, log-prob passes that are not told otherwise use this `chunked_lm_head` setting."""
    token = _CHUNKED_LM_HEAD.set(setting)
    try:
        yield
    finally:
        _CHUNKED_LM_HEAD.reset(token)


def _vocab_size(head: torch.nn.Module) -> int | None:
    size = getattr(head, "out_features", None)  # nn.Linear and PEFT's wrapped layers (kept under ZeRO-3 too)
    weight = getattr(head, "weight", None)
    if size is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        size = weight.shape[0]
    return size


def uses_chunked_head(setting: str | bool | None, rows: int, head: torch.nn.Module,
                      auto_bytes: int | None = None) -> bool:
    """Whether a pass with gradients over `rows` trained rows runs the head chunk by chunk: `setting` True/False,
    or "auto" (None: the current `lm_head_chunking` setting) = when the (rows, V) float32 softmax would exceed
    `auto_bytes` (HEAD_CHUNK_AUTO_BYTES; passes that keep several such tensors count them in `rows`)."""
    setting = _CHUNKED_LM_HEAD.get() if setting is None else setting
    if setting == "auto":
        vocab = _vocab_size(head)
        limit = HEAD_CHUNK_AUTO_BYTES if auto_bytes is None else auto_bytes
        return vocab is not None and rows * vocab * 4 > limit
    if setting in (True, "true", False, "false"):  # the config spells them as strings
        return setting in (True, "true")
    raise UserError(f"chunked_lm_head must be 'auto', True or False, got {setting!r}.")


def _head_chunk_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                      keys: tuple[str, ...], chunk_size: int, calls: list | None = None) -> tuple[torch.Tensor, ...]:
    """head → fused log-softmax on one chunk. `calls` counts the calls under checkpointing: the first (the forward)
    computes the statistics in `keys`; later ones (the recompute in the backward, which needs only the softmax)
    skip them."""
    if calls is not None:
        calls.append(None)
        # the recompute keeps the entropy (its backward needs it, and the saved tensors must match)
        keys = keys if len(calls) == 1 else tuple(key for key in keys if key == "entropy")
    return _SelectiveLogSoftmax.apply(head(hidden), targets, temperature, keys, chunk_size)


def _checkpointed_head_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                             temperature: float, keys: tuple[str, ...], chunk_size: int,
                             rows_to_cover: int = 0) -> tuple[torch.Tensor, ...]:
    """head → fused log-softmax, `head_chunk_rows` rows at a time, each under non-reentrant activation
    checkpointing: the forward keeps neither a chunk's logits nor its softmax, and the backward recomputes them one
    chunk at a time, so at most one chunk's (rows, V) tensors exist. Costs one more head matmul per chunk (the
    recompute). Any head module works (tied embeddings, LoRA, a bias): its parameters get their gradients through
    the recomputed call. `rows_to_cover` (> the rows held) adds empty chunks, so that this process calls the head as
    often as one holding that many rows (ZeRO-3)."""
    rows, n = head_chunk_rows(head), targets.shape[0]
    parts = [checkpoint(_head_chunk_stats, hidden[start:start + rows], head, targets[start:start + rows],
                        temperature, keys, chunk_size, [], use_reentrant=False)
             for start in range(0, max(n, rows_to_cover), rows)]
    if not parts:  # no trained rows: keep the graph connected so backward() still works
        return _head_chunk_stats(hidden, head, targets, temperature, keys, chunk_size)
    return tuple(torch.cat(column) for column in zip(*parts))


def _needs_grad(hidden: torch.Tensor, head: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))


def token_logps(logits: torch.Tensor | None, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, with_metrics: bool = False, with_log_sum_p2: bool = False,
                chunk_size: int = CHUNK_ROWS, hidden: torch.Tensor | None = None, head: torch.nn.Module | None = None,
                chunked_lm_head: str | bool | None = None) -> dict[str, torch.Tensor]:
    """log softmax(logits / temperature)[target] per row, plus the per-row statistics the trainers log.

    Args: logits (N, V), targets (N,) — or hidden (N, H) and the LM head instead of logits (what
    `forward_target_rows` returns), so that the head can run chunk by chunk. `chunked_lm_head` ("auto", True,
    False; None = the current `lm_head_chunking` setting, "auto" by default) decides whether a pass with gradients
    does so (`uses_chunked_head`); without gradients it always does.
    Returns {"logps": (N,) float32 (differentiable when logits, hidden or the head are)}, with "entropy": (N,)
    entropy of softmax(logits / temperature) when `with_entropy`, "logits_mean": (N,) mean raw logit and
    "correct": (N,) bool target == argmax when `with_metrics` (reference and old-policy passes ask for neither),
    and "log_sum_p2": (N,) log Σ_v softmax(logits / temperature)_v² when `with_log_sum_p2` (WPO), all detached.
    Without gradients it works chunk by chunk and keeps nothing.
    """
    keys = _stat_keys(with_entropy, with_metrics, with_log_sum_p2)
    # Under ZeRO-3 every call of the head gathers its weights from all processes: the calls (chunks) are counted
    # from the most rows any process holds, so that all processes make the same calls.
    rows = targets.shape[0]
    if logits is None and collective_forwards(head):
        rows = max_over_processes(rows, hidden.device)
    if logits is None and _needs_grad(hidden, head):
        if uses_chunked_head(chunked_lm_head, rows, head):
            return dict(zip(("logps", *keys), _checkpointed_head_stats(hidden, head, targets, temperature, keys,
                                                                         chunk_size, rows)))
        logits = head(hidden)
    if logits is not None and logits.requires_grad and torch.is_grad_enabled():
        return dict(zip(("logps", *keys), _SelectiveLogSoftmax.apply(logits, targets, temperature, keys,
                                                                     chunk_size)))
    with torch.no_grad():
        if logits is not None:
            return _chunked_stats(lambda start, end: logits[start:end], targets, temperature, keys, chunk_size)
        out = _chunked_stats(lambda start, end: head(hidden[start:end]), targets, temperature, keys, chunk_size)
        n = targets.shape[0]
        for _ in range((rows + chunk_size - 1) // chunk_size - (n + chunk_size - 1) // chunk_size):
            head(hidden[:0])  # the calls other processes make on their extra rows
        return out


def selective_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row.

    Args: logits (N, V), targets (N,). Returns: (N,) float32 log-probs (differentiable).
    """
    return token_logps(logits, targets, temperature, chunk_size=chunk_size)["logps"]
