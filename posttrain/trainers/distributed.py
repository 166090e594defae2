"""What online trainers need to run on several processes: which rows of a generation batch this process holds,
a sampling seed of its own, and the whole batch's rewards for group statistics.

Layout: the sampler walks global generation batches of `generation_batch_size × num_processes` rows (groups of G
consecutive rows share a prompt); process p holds rows [p·n, (p+1)·n) with n = generation_batch_size, so a group
may span processes. Each process generates and scores its own rows; per-row values (rewards, RLOO's KL-penalised
totals) are gathered in global row order (`OnlineTrainer.gather_rows`), advantages computed once over the whole
batch, and each process keeps its rows. With one process every function here is the identity.

Not here: the rollout cycle (`trainers/online.py`), the advantage maths (`algorithms/advantages.py`).
"""

from __future__ import annotations

import contextlib

import torch

def group_runs(offset: int, num_rows: int, group_size: int) -> list[int]:
    """Lengths of the runs of consecutive rows that share a prompt in rows [offset, offset + num_rows) of a batch
    grouped by `group_size`: e.g. offset 2, 6 rows, G 4 → [2, 4]."""
    runs, row = [], offset
    while row < offset + num_rows:
        end = min((row // group_size + 1) * group_size, offset + num_rows)
        runs.append(end - row)
        row = end
    return runs


@contextlib.contextmanager
def process_seed(accelerator, seed: int, step: int):
    """With several processes, sample under a seed of this process and step (the global RNG is restored after);
    with one process, change nothing. Trainers seed every process alike, so without this the rows of a group split
    across processes would be sampled with the same random numbers and come out identical."""
    if accelerator.num_processes == 1:
        yield
        return
    device = accelerator.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1_000_003 * (accelerator.process_index + 1) + 7919 * step)
        yield


def local_rows(accelerator, values: torch.Tensor, num_rows: int, training: bool) -> torch.Tensor:
    """This process's rows of a tensor computed over the gathered batch (the identity when nothing was gathered)."""
    if accelerator.num_processes == 1 or not training:
        return values
    start = accelerator.process_index * num_rows
    return values[start:start + num_rows]
