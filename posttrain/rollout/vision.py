"""Sampling completions of prompts that hold images (GRPO, RLOO on vision-language models).

Where the static-cache loop of `rollout/hf.py` can run (a full-attention model, sampling options it implements) and
the model's positions are plain 1-D ones (LLaVA, Idefics3/SmolVLM), the unique prompts prefill once with their
images (the pixel tensors go to the prefill forward only) and their caches are repeated for the group; decoding is
text-only from there, exactly as for text prompts. Models whose positions depend on where the image tokens are
(Qwen2-VL's M-RoPE: the processor emits `mm_token_type_ids`), and any other sampling option, go through
transformers' `generate`, every row running its own prefill with its images. Either way the result is the same
`Rollout` as for text. Image tokens are never sampled (`suppress_tokens`): one in a completion would have no image
behind it.

Not here: image tokenising and pixel tensors (`data/vision.py`), text generation (`rollout/hf.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.models.sharding import collective_forwards
from posttrain.rollout.hf import (
    _eos_ids,
    completion_mask_after_eos,
    inverse_cdf_sampling,
    left_pad,
    sampling_config,
    static_decode,
    static_decode_supported,
)
from posttrain.rollout.types import Rollout


def to_model(inputs: dict, model) -> dict:
    """Image tensors on the model's device; floating ones in its dtype."""
    parameter = next(model.parameters())
    return {k: v.to(parameter.device, dtype=parameter.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


def generate_with_images(model, processor, prompt_ids: list[list[int]], prompt_images: list[list],
                         num_generations: int | list[int], max_new_tokens: int,
                         generation_kwargs: dict[str, Any]) -> Rollout:
    """`num_generations` completions of each prompt (its images in `prompt_images`); N = Σ counts rows, each
    prompt's completions consecutive, as `rollout/hf.generate`."""
    from posttrain.data.vision import image_tokenizer

    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    counts = [num_generations] * len(prompt_ids) if isinstance(num_generations, int) else list(num_generations)
    ids, mask = left_pad(prompt_ids, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    repeats = torch.tensor(counts, device=device)
    full_ids, full_mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    tokens = image_tokenizer(processor)
    # a sampled image token would have no image behind it (the next forward fails, or reads another row's features)
    suppress = sorted(set(generation_kwargs.get("suppress_tokens") or []) | tokens.image_ids)
    kwargs = dict(generation_kwargs, suppress_tokens=suppress)
    eos_ids = _eos_ids(model, tokenizer)
    config = sampling_config(model, kwargs, max_new_tokens)
    synced = collective_forwards(model)  # ZeRO-3/FSDP: every process runs as many forwards as the longest
    with torch.no_grad(), inverse_cdf_sampling(device):
        if config is not None and static_decode_supported(model) and not tokens.token_types(ids):
            pixels = to_model(tokens.pixel_inputs(prompt_images), model)  # each unique prompt's images, once
            completion_ids = static_decode(model, ids, mask, repeats, config, eos_ids, pad_id, synced,
                                           prefill_inputs=pixels)
        else:
            kwargs.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                          return_dict_in_generate=False, **({"synced_gpus": True} if synced else {}))
            row_images = [images for images, n in zip(prompt_images, counts) for _ in range(n)]
            pixels = to_model(tokens.pixel_inputs(row_images), model)
            out = model.generate(input_ids=full_ids, attention_mask=full_mask, **pixels,
                                 **tokens.token_types(full_ids), **kwargs)
            completion_ids = out[:, full_ids.shape[1]:]
    completion_mask, truncated = completion_mask_after_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    return Rollout(prompt_ids=full_ids, prompt_mask=full_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, is_truncated=truncated)
