"""Sampling completions of prompts that hold images (GRPO, RLOO on vision-language models).

Every row runs its own prefill with its images through transformers' `generate` (the shared-prefill and static-cache
paths of `rollout/hf.py` feed token ids only); the result is the same `Rollout` as for text. Image tokens are never
sampled (`suppress_tokens`): one in a completion would have no image behind it.

Not here: image tokenising and pixel tensors (`data/vision.py`), text generation (`rollout/hf.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.rollout.hf import _eos_ids, left_pad, rollout_after_eos
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
    repeats = torch.tensor(counts)
    full_ids, full_mask = ids.repeat_interleave(repeats, 0).to(device), mask.repeat_interleave(repeats, 0).to(device)
    row_images = [images for images, n in zip(prompt_images, counts) for _ in range(n)]
    tokens = image_tokenizer(processor)
    pixels = to_model(tokens.pixel_inputs(row_images), model)
    # a sampled image token would have no image behind it (the next forward fails, or reads another row's features)
    suppress = sorted(set(generation_kwargs.get("suppress_tokens") or []) | tokens.image_ids)
    kwargs = dict(generation_kwargs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                  return_dict_in_generate=False, suppress_tokens=suppress)
    with torch.no_grad():
        out = model.generate(input_ids=full_ids, attention_mask=full_mask, **pixels, **tokens.token_types(full_ids),
                             **kwargs)
    return rollout_after_eos(full_ids, full_mask, out[:, full_ids.shape[1]:], _eos_ids(model, tokenizer), pad_id)
