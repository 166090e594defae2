"""Rows of a batch that begin with the same tokens run those tokens through the model once.

A GRPO/RLOO step trains on G completions of each prompt, and its batch repeats every prompt G times; online DPO
repeats it twice. `forward_shared_prefix` runs the distinct prefixes once with a KV cache, gathers each layer's
keys and values back to the batch's rows (the gather's backward sums the copies' gradients, so the result and its
gradients equal the plain forward's), and runs the remaining columns against that cache. On the benchmark GRPO
batch (2 prompts of 64–256 tokens × 8 completions of ≤128) the model body sees about half the tokens it did.

Only for decoder-only models with full attention under sdpa or eager attention (`full_attention_model`), and not
under gradient checkpointing (transformers turns the cache off there), nor for a Mixture-of-Experts model that
returns its router loss (the loss must cover whole rows); the caller falls back to one plain forward.

Not here: which columns carry a loss, the LM head (`models/logprobs.py`).
"""

from __future__ import annotations

import functools
import inspect

import torch


def full_attention_model(model: torch.nn.Module) -> bool:
    """A decoder-only transformers model under sdpa or eager attention whose layers all attend to the whole past
    (sliding-window layers need per-layer masks; flash attention takes no additive masks)."""
    from posttrain.models.logprobs import _base_model

    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "generate") or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:  # older configs: a sliding window is on when set (and not switched off)
        sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False
        layer_types = ["sliding_attention" if sliding else "full_attention"]
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager", "posttrain_packed")
            and all(t == "full_attention" for t in layer_types))


@functools.lru_cache(maxsize=64)
def cache_argument(model_cls: type) -> str:
    """The forward argument that takes a KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _checkpointing(model: torch.nn.Module) -> bool:
    """Gradient checkpointing is on (transformers ≥ 5.x names it `is_activation_checkpointing`)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _returns_router_loss(base: torch.nn.Module, model_kwargs: dict) -> bool:
    """A Mixture-of-Experts model set to return its router load-balancing loss (`trainers/router_loss.py`): the loss
    of a split forward would cover the prefix once and mismatch the second pass's mask, so it runs whole. Passes no
    loss reads run with the router logits off (the online rollouts; frozen models: `models/reference.py`)."""
    if "output_router_logits" in model_kwargs:
        return bool(model_kwargs["output_router_logits"])
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "output_router_logits", False))


def forward_shared_prefix(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          position_ids: torch.Tensor, prefix_len: int, **model_kwargs):
    """The model's output for columns prefix_len..T-1 of every row, with the first `prefix_len` columns computed
    once per distinct (ids, mask) prefix; None when that cannot be done or saves nothing (then run the plain
    forward).

    Args: input_ids, attention_mask, position_ids (B, T); prefix_len ≥ 1 columns that no loss reads the logits of.
    Returns: the second forward's output (hidden states and logits cover T − prefix_len columns) or None.
    """
    from posttrain.models.logprobs import _base_model

    B, T = input_ids.shape
    base = _base_model(model)
    if (prefix_len < 1 or prefix_len >= T or attention_mask is None or attention_mask.dim() != 2
            or _checkpointing(base) or not full_attention_model(model)):
        return None
    if _returns_router_loss(base, model_kwargs):
        return None  # the policy's loss pass (train or eval): its router loss is the plain forward's, whole rows
    key = torch.cat([input_ids[:, :prefix_len], attention_mask[:, :prefix_len].to(input_ids.dtype)], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if unique.shape[0] == B:
        return None
    first = torch.full((unique.shape[0],), B, dtype=torch.long, device=input_ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(B, device=input_ids.device), reduce="amin")
    from transformers import DynamicCache

    argument = cache_argument(type(base))
    cache = DynamicCache()
    model(input_ids=input_ids[first, :prefix_len], attention_mask=attention_mask[first, :prefix_len],
          position_ids=position_ids[first, :prefix_len], use_cache=True, **{argument: cache}, **model_kwargs)
    # each row's copy of its prefix's keys and values; index_select's backward adds the copies' gradients up
    layers = [(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse)) for layer in cache.layers]
    expanded = DynamicCache(ddp_cache_data=layers)
    return model(input_ids=input_ids[:, prefix_len:], attention_mask=attention_mask,
                 position_ids=position_ids[:, prefix_len:], use_cache=True, **{argument: expanded}, **model_kwargs)
