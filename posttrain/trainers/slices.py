"""`max_tokens_per_backward`: one micro-batch through forward and backward in slices of rows, one slice's activations
in memory at a time. Exact wherever a trainer's loss is a sum of per-row (or per-pair) terms divided by the optimizer
step's item count (`num_items_in_batch`, or the online family's reduction contract): each slice's loss is then its
share of the step's, and the gradients add up to the whole micro-batch's. `PostTrainer.training_step` runs the
slices that a trainer's `backward_slices` returns.

Not here: which trainers slice (the configs that declare `max_tokens_per_backward`) and their refusals.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.errors import UserError


def token_slices(batch: dict[str, Any], budget: int, paired: bool = False) -> list[dict[str, Any]]:
    """A micro-batch as consecutive slices of at most `budget` real tokens (attention_mask) each; a unit longer than
    the budget is a slice of its own. A unit is a row, or with `paired` a preference pair — rows i and B + i of a
    (2B, T) batch with chosen rows first, kept together with the (B,) per-pair columns. Per-row tensors are sliced;
    non-tensors and 0-d tensors (the step's item counts) are shared by every slice; any other tensor (a vision
    model's image patches) cannot be split by row and is refused."""
    tokens = batch["attention_mask"].sum(1)
    rows = len(tokens)
    units = rows // 2 if paired else rows
    per_unit = (tokens[:units] + tokens[units:]) if paired else tokens
    bounds, start, used = [], 0, 0
    for unit, n in enumerate(per_unit.tolist()):
        if unit > start and used + n > budget:
            bounds.append((start, unit))
            start, used = unit, 0
        used += n
    bounds.append((start, units))
    if len(bounds) == 1:
        return [batch]

    def part(value: Any, a: int, b: int) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if value.shape[0] == rows:
            return torch.cat([value[a:b], value[units + a:units + b]]) if paired else value[a:b]
        if paired and value.shape[0] == units:
            return value[a:b]
        raise UserError(f"max_tokens_per_backward cannot split this batch by row: its tensor of shape "
                        f"{tuple(value.shape)} is not one entry per row (e.g. a vision model's image patches); "
                        "drop max_tokens_per_backward and lower per_device_train_batch_size instead.")

    return [{k: part(v, a, b) for k, v in batch.items()} for a, b in bounds]
