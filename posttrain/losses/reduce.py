"""Reduction of unreduced losses with global normalisers.

A micro-batch's contribution is sum(loss) / N_global, where N_global is the number of loss items (tokens, pairs,
sequences) in the whole accumulated batch on all processes. Summing the contributions over accumulation steps
then gives exactly the loss of one big batch; under data parallelism each process's gradient is multiplied by the
number of processes because DDP averages gradients across them.

The contract every trainer follows: a loss function returns unreduced per-item terms and their unit (token,
sequence, pair, example); the trainer counts each unit once per optimizer step over all micro-batches and processes
and reduces with `global_sum_reduce`. The one exception is a parity switch that reproduces a TRL normalisation that is
local to a micro-batch (`local_reduce`).

Not here: how N_global is counted (the trainers' base classes: `count_loss_items`, `trainers/online_batches.py`).
"""

from __future__ import annotations

import torch


def global_sum_reduce(loss: torch.Tensor, num_items: torch.Tensor | float, num_processes: int = 1) -> torch.Tensor:
    """sum(loss) * num_processes / num_items.

    Args: loss (any shape) unreduced, already masked; num_items: global item count of the accumulated batch;
    num_processes: data-parallel world size (DDP averages gradients, so this undoes the average).
    """
    return loss.sum() * num_processes / num_items


def local_reduce(terms: torch.Tensor, local_count: torch.Tensor | float, accumulation_steps: int) -> torch.Tensor:
    """sum(terms) / local_count / accumulation_steps: a micro-batch normalised by its own item count, the
    micro-batches of an optimizer step averaged (TRL's bnpo/grpo/dr_grpo/sapo; DDP then averages processes).
    Not invariant to how the batch is split when micro-batches hold different counts."""
    return terms.sum() / torch.as_tensor(local_count, dtype=terms.dtype).clamp(min=1) / accumulation_steps
