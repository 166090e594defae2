"""Generation with transformers' `generate` and a KV cache, batched, for online trainers.

A prompt's G completions share one prefill: the unique prompts run once through the model, the resulting cache is
repeated G times, and decoding continues from it — so prefill cost does not grow with num_generations. Prompts
that begin alike (a chat template's system prompt) prefill that common head once for all of them. Tokens after
the first EOS are masked out.

Decoding runs in a loop of our own over a preallocated (static) KV cache when the model and the sampling options
allow it (`static_decode_supported`): sampling (temperature, top_k, top_p, min_p), greedy, repetition_penalty,
min_new_tokens and suppress_tokens, with transformers' own logits warpers in `generate`'s order, on a decoder-only model with sdpa or
eager attention and no sliding-window layers. Anything else (beam search, stop strings, other processors,
flash-attention, sliding windows) goes to transformers' `generate`. The loop saves what `generate` spends per token
on growing the cache (`torch.cat` of every layer's keys and values), rebuilding the attention mask and running
stopping criteria: ~30% of a rollout of the benchmark model on a CPU (benchmarks/RESULTS.md).

Not here: log-probs for training (`models/logprobs.py`), rewards (`rewards/`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any

import torch
from transformers import (
    Cache,
    DynamicCache,
    GenerationConfig,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from posttrain.models.logprobs import _base_model, _forward_accepts_logits_to_keep, positions_from_mask
from posttrain.models.sharding import collective_forwards, max_over_processes
from posttrain.models.shared_prefix import cache_argument, full_attention_model
from posttrain.rollout.types import Rollout

# generation options the static-cache loop implements; any other option away from its default goes to `generate`
_LOOP_OPTIONS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "min_new_tokens",
                 "max_new_tokens", "max_length", "pad_token_id", "eos_token_id", "bos_token_id", "use_cache",
                 "return_dict_in_generate", "transformers_version", "_from_model_config", "cache_implementation",
                 "suppress_tokens"}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (N, max_len), sequences aligned to the right: `right_pad` mirrored."""
    ids, mask = right_pad([list(reversed(s)) for s in sequences], pad_id)
    return ids.flip(1), mask.flip(1)


def right_pad(sequences, pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (N, width), sequences (token lists or 1-D tensors, at most `width` long) aligned to the
    left; width defaults to the longest sequence (at least 1)."""
    width = max(max((len(s) for s in sequences), default=0), 1) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, C), truncated (N,)): 1 up to and including the first EOS; truncated when a row has no EOS."""
    eos = torch.tensor(sorted(e for e in eos_ids if e is not None), dtype=completion_ids.dtype)
    is_eos = torch.isin(completion_ids, eos.to(completion_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS earlier in the row
    return (~seen_before).long(), ~is_eos.any(dim=1)


def inverse_cdf_draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` (R, V; unnormalised, non-negative) drawn with the uniforms (R, 1) in [0, 1):
    the first index whose cumulative weight (float64) exceeds u × the row's total."""
    cdf = weights.cumsum(-1, dtype=torch.float64)
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=weights.shape[1] - 1)


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
        return inverse_cdf_draw(input, torch.rand(input.shape[0], 1, dtype=torch.float64, generator=generator))

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], num_generations: int | list[int], max_new_tokens: int,
             generation_kwargs: dict[str, Any], share_prefill: bool = True, greedy_first: bool = False) -> Rollout:
    """Sample `num_generations` completions for each prompt (prompt_ids lists the UNIQUE prompts); a list gives
    each prompt its own count (a process's slice of a generation batch may hold part of a group at either end).

    Returns a Rollout with N = Σ counts rows, each prompt's completions consecutive.
    Under ZeRO-3/FSDP each forward is a collective: every process then decodes until the last row on any process
    has ended (and makes the same prefill calls), so that all run the same number of forwards.
    `greedy_first`: each prompt's first completion is its greedy one, the others sampled as asked, from one prefill
    (an evaluation's greedy and sampled answers); only on the static-cache loop (`greedy_first_supported`).
    """
    pad_id = tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    repeats = num_generations if isinstance(num_generations, int) else torch.tensor(num_generations, device=device)
    full_ids = ids.repeat_interleave(repeats, dim=0)
    full_mask = mask.repeat_interleave(repeats, dim=0)
    eos_ids = _eos_ids(model, tokenizer)
    config = sampling_config(model, generation_kwargs, max_new_tokens)
    synced = collective_forwards(model)
    if greedy_first and not greedy_first_supported(model, generation_kwargs, max_new_tokens):
        raise ValueError("greedy_first needs sampling (do_sample=True) on the static-cache decoding loop "
                         "(greedy_first_supported); decode the greedy answers in a call of their own")
    with inverse_cdf_sampling(device):
        if config is not None and static_decode_supported(model):
            greedy = None
            if greedy_first:  # the first row of each prompt's group
                counts = torch.as_tensor(repeats, device=device).expand(len(prompt_ids))
                greedy = torch.zeros(int(counts.sum()), dtype=torch.bool, device=device)
                greedy[counts.cumsum(0) - counts] = True
            if not share_prefill:  # every row prefills its own copy of the prompt
                ids, mask, repeats = full_ids, full_mask, 1
            completion_ids = static_decode(model, ids, mask, repeats, config, eos_ids, pad_id, synced,
                                           greedy_rows=greedy)
        else:
            completion_ids = _transformers_generate(model, ids, mask, full_ids, full_mask, num_generations,
                                                    max_new_tokens, generation_kwargs, pad_id, share_prefill, synced)
    return rollout_after_eos(full_ids, full_mask, completion_ids, eos_ids, pad_id)


def rollout_after_eos(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions, eos_ids: set[int],
                      pad_id: int) -> Rollout:
    """The `Rollout` of completions, each ending at its first EOS, padding after it (is_truncated: no EOS), on the
    prompts' device. completions: generated ids (N, C); or token lists / 1-D tensors of any lengths (an engine's, a
    user's), right-padded here and cut to the longest one up to its EOS."""
    written = None
    if not isinstance(completions, torch.Tensor):
        completions, written = right_pad(completions, -1)  # -1: the padding is no EOS
    mask, truncated = completion_mask_after_eos(completions, eos_ids)
    if written is not None:
        mask &= written
        width = max(int(mask.sum(1).max()), 1)
        completions, mask = completions[:, :width], mask[:, :width]
    device, completions = prompt_ids.device, completions.masked_fill(mask == 0, pad_id)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completions.to(device),
                   completion_mask=mask.to(device), is_truncated=truncated.to(device))


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids: a completion ends at the first of either."""
    found = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    return {eos for ids in found for eos in (ids if isinstance(ids, list) else [ids])} - {None}


def _transformers_generate(model, ids, mask, full_ids, full_mask, num_generations, max_new_tokens,
                           generation_kwargs, pad_id, share_prefill, synced=False) -> torch.Tensor:
    """Completion ids (N, C) from transformers' `generate`, continuing from one shared prefill per prompt
    (`synced`: forwards are collectives; no shared prefill, whose extra forward depends on this process's counts)."""
    kwargs = dict(generation_kwargs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                  return_dict_in_generate=False, synced_gpus=True if synced else None)  # None: transformers decides
    # the shared prefill repeats the cache by one count for all prompts: uneven counts prefill per row; a chosen
    # cache_implementation (its own cache) and beam search (a batch num_beams wider) cannot continue one made here
    if (share_prefill and not synced and isinstance(num_generations, int) and num_generations > 1
            and ids.shape[1] > 1 and "cache_implementation" not in generation_kwargs
            and generation_kwargs.get("num_beams", 1) == 1):
        position_ids = positions_from_mask(mask)
        prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                       use_cache=True)
        cache_key = cache_argument(type(_base_model(model)))  # `cache` from transformers 5.2x, `past_key_values` before
        cache = prefix[cache_key]
        cache.batch_repeat_interleave(num_generations)
        kwargs[cache_key] = cache
    out = model.generate(input_ids=full_ids, attention_mask=full_mask, **kwargs)
    return out[:, full_ids.shape[1]:]


def sampling_config(model, generation_kwargs: dict[str, Any], max_new_tokens: int) -> GenerationConfig | None:
    """The model's generation config updated with `generation_kwargs`, or None when it asks for anything the
    static-cache loop does not implement (then transformers' `generate` runs)."""
    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    unknown = config.update(**generation_kwargs, max_new_tokens=max_new_tokens)
    defaults = GenerationConfig().to_dict()
    changed = {k for k, v in config.to_dict().items() if k not in _LOOP_OPTIONS and v != defaults.get(k)
               and not (v in (None, False) and defaults.get(k) in (None, False))}  # False written for an unset flag
    if unknown or changed or (config.num_beams or 1) != 1:
        return None
    if _has_repetition_penalty(config) and not _per_row_prompt_lengths():
        return None
    return config


@functools.cache
def _per_row_prompt_lengths() -> bool:
    """Whether this transformers' repetition penalty takes one prompt length per row (left-padded prompts need it;
    releases before 5.2x take one int only)."""
    try:
        RepetitionPenaltyLogitsProcessor(1.1, prompt_ignore_length=torch.tensor([0, 1]))
    except (ValueError, TypeError):
        return False
    return True


static_decode_supported = full_attention_model  # the static-cache loop's models (others use `generate`)


def greedy_first_supported(model, generation_kwargs: dict[str, Any], max_new_tokens: int) -> bool:
    """Whether `generate(..., greedy_first=True)` can decode greedy and sampled rows together: sampling options the
    static-cache loop implements, on a model it runs, not sharded (collective forwards)."""
    config = sampling_config(model, generation_kwargs, max_new_tokens)
    return (config is not None and bool(config.do_sample) and static_decode_supported(model)
            and not collective_forwards(model))


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers allocated once for the whole rollout: `update` writes
    the new positions in place and returns a view of the filled part (a DynamicLayer concatenates, copying the whole
    cache of every layer at every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.device = keys.device
        self._keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        self.filled = 0
        self.is_initialized = True
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        self._keys[:, :, self.filled:end] = key_states
        self._values[:, :, self.filled:end] = value_states
        self.filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop every batch row not in `index` (the rows still decoding) from the buffers."""
        self._keys, self._values = self._keys.index_select(0, index), self._values.index_select(0, index)
        self.keys, self.values = self._keys[:, :, :self.filled], self._values[:, :, :self.filled]


_MIN_SHARED_TOKENS = 64  # prefill the common head apart only when that saves at least this many token positions


def _all_ended(finished: torch.Tensor, synced: bool) -> bool:
    """Every row has produced an EOS — on every process when `synced` (one all-reduce per decode step)."""
    ended = bool(finished.all())
    return not max_over_processes(int(not ended), finished.device) if synced else ended


def _has_repetition_penalty(config: GenerationConfig) -> bool:
    return config.repetition_penalty is not None and config.repetition_penalty != 1.0


def _logits_warpers(config: GenerationConfig, ids: torch.Tensor, mask: torch.Tensor) -> list:
    """transformers' processors for these options, in the order `generate` applies them."""
    processors = []
    if _has_repetition_penalty(config):
        padding = (mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=padding))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        top_k = 50 if config.top_k is None else config.top_k  # `generate` fills an unset top_k with 50; 0 = off
        if top_k != 0:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p))
    return processors


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, 1, Q, K) "may attend" → the additive mask sdpa and eager attention both take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def common_prefix_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading real tokens every left-padded row (ids, mask (U, P)) has in common — a chat template's
    system prompt, say — at most the shortest row's length − 1 (each row keeps a token of its own to prefill)."""
    lengths = mask.sum(1)
    span = int(lengths.min()) - 1
    if ids.shape[0] < 2 or span < 1:
        return 0
    start = (ids.shape[1] - lengths)[:, None]  # the first real column of each row
    heads = ids.gather(1, start + torch.arange(span, device=ids.device))
    return int((heads == heads[:1]).all(0).long().cumprod(0).sum())


def pads_after_prefix(ids: torch.Tensor, mask: torch.Tensor, shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows re-laid as [the `shared` common tokens][padding][the rest]: the common tokens then sit in
    the same columns of every row and can be prefilled once. Positions follow the mask, so they do not change."""
    P = ids.shape[1]
    pads = (P - mask.sum(1))[:, None]
    column = torch.arange(P, device=ids.device)[None]
    source = torch.where(column < shared, column + pads, torch.where(column < shared + pads, column - shared, column))
    return ids.gather(1, source), mask.gather(1, source)


def static_decode(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int | torch.Tensor,
                  config: GenerationConfig, eos_ids: set[int], pad_id: int, synced: bool = False,
                  prefill_inputs: dict[str, torch.Tensor] | None = None,
                  greedy_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Completion ids (N, ≤ max_new_tokens): prefill the left-padded unique prompts `ids` (U, P) once, repeat their
    cache `repeats` times into a static cache of length P + max_new_tokens, then decode one token per step.

    Rows that have produced an EOS are fed `pad_id` and ignored (as `generate` does); the loop stops when every row
    has ended (with `synced`, every row of every process: ZeRO-3/FSDP forwards are collectives). Positions follow
    the unpadded prompt (position_ids), so left padding does not shift them. `prefill_inputs`: more inputs of the
    prefill forward only (a vision-language model's pixel tensors of the unique prompts' images: decoding is text).
    `greedy_rows` (N bools): those rows take the argmax of the processed logits instead of a draw — the greedy
    answer, since temperature, top-k, top-p and min-p keep the largest logit largest (a repetition penalty applies
    to them as in greedy `generate`); the other rows draw as before, from the same uniforms.
    Once a quarter of the rows still in the batch have ended, they leave it (their cache rows are dropped): a batch
    of short answers with one long one no longer decodes every row to the longest. The tokens are the same as
    without compaction — on the CPU each step still draws one uniform per row of the whole batch, in the same order
    — so this is skipped only where rows interact (`synced`, a repetition penalty that tracks every row).
    """
    max_new = config.max_new_tokens
    dtype = next(model.parameters()).dtype
    device = ids.device
    U, P = ids.shape
    length = P + max_new
    keep_logits = {"logits_to_keep": 1} if _forward_accepts_logits_to_keep(type(_base_model(model))) else {}
    penalty = _has_repetition_penalty(config)
    # the prompts' common head (a chat template's system prompt: ~a quarter of a short question) is prefilled once;
    # not where the prefill takes more inputs or the model is a VLM (its positions may come from the images),
    # forwards are collectives, or a penalty reads the layout
    vision = getattr(_base_model(model).config, "vision_config", None) is not None
    shared = 0 if prefill_inputs or vision or synced or penalty else common_prefix_length(ids, mask)
    if shared * (U - 1) < _MIN_SHARED_TOKENS:
        shared = 0
    if shared:
        ids, mask = pads_after_prefix(ids, mask, shared)
    positions = positions_from_mask(mask)
    # prompt tokens attend to earlier non-pad tokens; a pad query attends to itself (a fully masked row gives NaN)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    allowed = (causal & mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
    cache_key = cache_argument(type(_base_model(model)))  # `cache` from transformers 5.2x, `past_key_values` before
    prefix_cache = DynamicCache(config=model.config)
    if shared:  # one row's copy of the common columns, its keys and values then shared by every row
        model(input_ids=ids[:1, :shared], attention_mask=_additive_mask(allowed[:1, None, :shared, :shared], dtype),
              position_ids=positions[:1, :shared], use_cache=True, **{cache_key: prefix_cache}, **keep_logits)
        for layer in prefix_cache.layers:
            layer.keys, layer.values = layer.keys.expand(U, -1, -1, -1), layer.values.expand(U, -1, -1, -1)
    out = model(input_ids=ids[:, shared:], attention_mask=_additive_mask(allowed[:, None, shared:], dtype),
                position_ids=positions[:, shared:], use_cache=True, **{cache_key: prefix_cache}, **keep_logits,
                **(prefill_inputs or {}))
    logits = out.logits[:, -1].float().repeat_interleave(repeats, dim=0)
    cache = Cache(layers=[PreallocatedLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                            layer.values.repeat_interleave(repeats, dim=0), length)
                          for layer in prefix_cache.layers])
    del prefix_cache, out
    N = logits.shape[0]
    sequence = torch.full((N, length), pad_id, dtype=torch.long, device=device)  # prompt + completion
    sequence[:, :P] = ids.repeat_interleave(repeats, dim=0)
    key_allowed = torch.zeros(N, length, dtype=torch.bool, device=device)
    key_allowed[:, :P] = mask.bool().repeat_interleave(repeats, dim=0)
    next_position = mask.sum(-1, keepdim=True).repeat_interleave(repeats, dim=0)
    processors = _logits_warpers(config, sequence[:, :P], key_allowed[:, :P])
    compact = not synced and not penalty
    cpu_draws = config.do_sample and device.type == "cpu"
    eos = torch.tensor(sorted(eos_ids), device=device)
    suppress = torch.tensor(sorted(config.suppress_tokens or []), dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # the rows still in the batch (all of them until one leaves)
    step = 0
    for step in range(max_new):
        if config.min_new_tokens and step < config.min_new_tokens:
            logits[:, eos] = -float("inf")
        logits[:, suppress] = -float("inf")  # before the warpers, as `generate` (-inf commutes with the penalty)
        for processor in processors:
            logits = processor(sequence[rows, :P + step], logits)
        if cpu_draws:  # one uniform per row of the whole batch, as without compaction
            token = inverse_cdf_draw(torch.softmax(logits, dim=-1),
                                     torch.rand(N, 1, dtype=torch.float64)[rows]).squeeze(1)
        elif config.do_sample:
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        if greedy_rows is not None:
            token = torch.where(greedy_rows[rows], logits.argmax(dim=-1), token)
        token = token.masked_fill(finished[rows], pad_id)
        sequence[rows, P + step] = token
        finished[rows] |= torch.isin(token, eos)
        if step == max_new - 1 or _all_ended(finished, synced):
            break
        key_allowed[:, P + step] = True
        going = ~finished[rows]
        if compact and 4 * int(going.sum()) <= 3 * len(rows):
            keep = going.nonzero().squeeze(1)
            rows = rows[keep]
            token = token[keep]
            for layer in cache.layers:
                layer.keep_rows(keep)
        visible = key_allowed[rows][:, None, None, :P + step + 1]
        out = model(input_ids=token[:, None], attention_mask=_additive_mask(visible, dtype),
                    position_ids=next_position[rows] + step, use_cache=True, **{cache_key: cache}, **keep_logits)
        logits = out.logits[:, -1].float()
    return sequence[:, P:P + step + 1]
