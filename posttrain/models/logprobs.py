"""The one place where logits become log-probabilities.

Lives here: which positions of a causal-LM batch carry a target, a forward pass that runs the LM head only on
those positions (`logits_to_keep`), per-token log-probs of given targets, and entropy — computed in row chunks so
the (N, V) float temporaries of log-softmax never exist for the whole batch at once.

Not here: losses (`losses/`), masks built from data (`data/`).

Why the head runs only on target positions: for small models the LM head is most of the compute (68% of FLOPs on
the 12M-param built-in benchmark model), and prompts/padding carry no loss.
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


def forward_target_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          **model_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Forward a causal LM and return the logits of trained targets only.

    Args: input_ids, labels (B, T) (labels in the Hugging Face convention: labels[t] is predicted at t-1);
    attention_mask (B, T) or None; position_ids (B, T) or None (padding-free/packed rows); model_kwargs go to the
    forward call as they are (e.g. PPO's policy-and-value container takes `with_values=True`).
    Returns: logits (N, V) of the N trained targets, targets (N,), valid (B, K) — where the N targets sit among
    the K kept positions of each row (row-major, so per-row sums are a scatter of the N values) — and the output.

    `use_cache=False` is forced: with a KV cache transformers does not detect packed rows from position_ids and
    packed documents would attend to each other.
    """
    keep = target_positions(labels)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **model_kwargs)
    if _forward_accepts_logits_to_keep(type(_base_model(model))):
        output = model(**kwargs, logits_to_keep=keep)
        logits = output.logits
    else:
        output = model(**kwargs)
        logits = output.logits[:, keep]
    targets = labels[:, keep + 1]
    valid = targets != IGNORE_INDEX
    return logits[valid], targets[valid], valid, output


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_log_sum_p2: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probs of each row's trained tokens (completions), laid out per row.

    Args: batch with input_ids, labels (R, T), optional attention_mask/position_ids.
    Returns: {"logps": (R, K) log-probs (0 where not trained), "mask": (R, K) bool, "logits_mean": (N,) mean raw
    logit over the vocabulary per trained token (detached, for the logits/* metrics), "log_sum_p2": (R, K)
    log Σ_v p_v² when asked (WPO), "logits": (N, V), "targets": (N,)}.
    """
    logits, targets, valid, _ = forward_target_logits(model, batch["input_ids"], batch["labels"],
                                                      batch.get("attention_mask"), batch.get("position_ids"))
    flat = selective_logps(logits, targets, temperature)
    logps = flat.new_zeros(valid.shape).masked_scatter(valid, flat)
    out = {"logps": logps, "mask": valid, "logits_mean": logits.detach().float().mean(-1), "logits": logits,
           "targets": targets}
    if with_log_sum_p2:
        with torch.no_grad():
            z = logits.detach().float() / temperature
            lsp2 = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            out["log_sum_p2"] = flat.new_zeros(valid.shape).masked_scatter(valid, lsp2)
    return out


def selective_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = 2048) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row.

    Args: logits (N, V), targets (N,). Returns: (N,) float32 log-probs (differentiable).
    """
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start:start + chunk_size].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        tgt = targets[start:start + chunk_size].unsqueeze(-1)
        out.append(chunk.gather(-1, tgt).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Entropy of softmax(logits) per row. Args: logits (N, V). Returns: (N,) float32 (no gradient)."""
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        logp = torch.log_softmax(logits[start:start + chunk_size].float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
