"""Generation with transformers' `generate` and a KV cache, batched, for online trainers.

A prompt's G completions share one prefill: the unique prompts run once through the model (all but their last
token), the resulting cache is repeated G times, and `generate` continues from it — so prefill cost does not grow
with num_generations. Tokens after the first EOS are masked out.

Not here: log-probs for training (`models/logprobs.py`), rewards (`rewards/`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from posttrain.rollout.types import Rollout


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (N, max_len), sequences aligned to the right."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq):] = torch.tensor(seq)
            mask[i, length - len(seq):] = 1
    return ids, mask


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, C), truncated (N,)): 1 up to and including the first EOS; truncated when a row has no EOS."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= completion_ids == eos
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS earlier in the row
    return (~seen_before).long(), ~is_eos.any(dim=1)


@contextlib.contextmanager
def inverse_cdf_sampling(device: torch.device):
    """Within the block, one-token-per-row `torch.multinomial` draws on the CPU go through the inverse CDF.

    transformers' sampler draws each next token with torch.multinomial, which on a CPU generates one exponential
    variate per vocabulary entry: 18.7 ms per call for 16 rows × 32k tokens, 39% of a 16 × 128-token rollout of
    the benchmark model (benchmarks/RESULTS.md). One uniform per row, searched in the cumulative distribution
    (float64), draws from the same distribution in well under a millisecond. Other calls (several samples, GPU
    tensors, an `out=`) go to torch unchanged; the original is restored on exit.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    original = torch.multinomial

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
        if input.dim() != 2 or num_samples != 1 or out is not None or input.device.type != "cpu":
            return original(input, num_samples, replacement, generator=generator, out=out)
        cdf = input.cumsum(-1, dtype=torch.float64)
        u = torch.rand(input.shape[0], 1, dtype=torch.float64, generator=generator) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=input.shape[1] - 1)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], num_generations: int | list[int], max_new_tokens: int,
             generation_kwargs: dict[str, Any], share_prefill: bool = True) -> Rollout:
    """Sample `num_generations` completions for each prompt (prompt_ids lists the UNIQUE prompts); a list gives
    each prompt its own count (a process's slice of a generation batch may hold part of a group at either end).

    Returns a Rollout with N = Σ counts rows, each prompt's completions consecutive.
    """
    pad_id = tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    repeats = num_generations if isinstance(num_generations, int) else torch.tensor(num_generations, device=device)
    full_ids = ids.repeat_interleave(repeats, dim=0)
    full_mask = mask.repeat_interleave(repeats, dim=0)
    kwargs = dict(generation_kwargs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                  return_dict_in_generate=False)
    # the shared prefill repeats the cache by one count for all prompts: uneven counts prefill per row
    if share_prefill and isinstance(num_generations, int) and num_generations > 1 and ids.shape[1] > 1:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                       use_cache=True)
        # transformers ≥ 5.2x names the cache `cache`; earlier 5.x releases call it `past_key_values`
        cache_key = "cache" if "cache" in prefix else "past_key_values"
        cache = prefix[cache_key]
        cache.batch_repeat_interleave(num_generations)
        kwargs[cache_key] = cache
    with inverse_cdf_sampling(device):
        out = model.generate(input_ids=full_ids, attention_mask=full_mask, **kwargs)
    completion_ids = out[:, full_ids.shape[1]:]
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    completion_mask, truncated = completion_mask_after_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    return Rollout(prompt_ids=full_ids, prompt_mask=full_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, is_truncated=truncated)
