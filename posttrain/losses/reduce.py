"""Reduction of unreduced losses with global normalisers.

A micro-batch's contribution is sum(loss) / N_global, where N_global is the number of loss items (tokens, pairs,
sequences) in the whole accumulated batch on all processes. Summing the contributions over accumulation steps
then gives exactly the loss of one big batch; under data parallelism each process's gradient is multiplied by the
number of processes because DDP averages gradients across them.

Not here: how N_global is counted (the trainer counts it once per optimizer step from all micro-batches).
"""

from __future__ import annotations

import torch


def global_sum_reduce(loss: torch.Tensor, num_items: torch.Tensor | float, num_processes: int = 1) -> torch.Tensor:
    """sum(loss) * num_processes / num_items.

    Args: loss (any shape) unreduced, already masked; num_items: global item count of the accumulated batch;
    num_processes: data-parallel world size (DDP averages gradients, so this undoes the average).
    """
    return loss.sum() * num_processes / num_items
