"""Attention for packed rows without a dense mask: each document of a padding-free / packed row attends
causally to itself through its own SDPA call.

transformers turns restarting `position_ids` into a block-diagonal (T, T) mask for SDPA (flash-attention's varlen
path needs CUDA). On a CPU the masked SDPA kernel then computes every block of the row — a packed row of 2,000
tokens costs the attention of one 2,000-token document, most of it thrown away — which is why padding-free rows
did not pay on CPUs (benchmarks/RESULTS.md). Here the row is cut at the documents' boundaries (where a position
does not follow the one before) and each piece runs the causal kernel with no mask, so the attention costs
Σ len² instead of (Σ len)², and the matmuls no longer run on padding. Anything else — padded batches, a KV cache,
dropout — goes to transformers' own SDPA function unchanged.

`use_packed_attention(model)` switches a model under "sdpa" to it (registered as "posttrain_packed", with SDPA's
mask function); `models/logprobs.py` and the trainers decide when a batch is packed.
Not here: building packed rows (`data/collators.py`, `data/packing.py`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

NAME = "posttrain_packed"


def document_bounds(position_ids: torch.Tensor) -> list[int] | None:
    """Start offsets of the documents in one packed row, plus its length: [0, s1, …, T]; None when the row is one
    document. position_ids (1, T): a document starts where a position is not the previous one + 1."""
    row = position_ids[0]
    starts = (row[1:] != row[:-1] + 1).nonzero(as_tuple=True)[0] + 1
    if starts.numel() == 0:
        return None
    return [0, *starts.tolist(), row.shape[0]]


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, H, T, D), key/value (1, H_kv, T, D) of one packed
    row → (1, T, H, D), one causal SDPA call per document; everything else goes to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    bounds = None
    if (position_ids is not None and query.shape[0] == 1 and position_ids.shape[0] == 1 and dropout == 0.0
            and key.shape[2] == query.shape[2] == position_ids.shape[-1] and not kwargs.get("output_attentions")):
        bounds = document_bounds(position_ids)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    is_causal=True, scale=scaling)
                     for a, b in itertools.pairwise(bounds)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_sdpa)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch `model` (and the models it wraps) from "sdpa" to the packed attention; True when it did."""
    from posttrain.models.logprobs import _base_model

    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    base.set_attn_implementation(NAME)
    return getattr(config, "_attn_implementation", None) == NAME
