"""What online trainers need to lay out generation batches and run on several processes: the sampler of generation
batches (each prompt repeated G times), which rows of a generation batch this process holds, and a sampling seed of
its own.

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
from torch.utils.data import Sampler


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


class RepeatSampler(Sampler):
    """Indices for generation batches: `unique` prompts per batch, each repeated `mini_repeat` (= G) times in a
    row; every batch is yielded `repeat` times (num_iterations × steps_per_generation micro-steps use it)."""

    def __init__(self, num_rows: int, mini_repeat: int, unique: int, repeat: int, shuffle: bool, seed: int):
        self.num_rows, self.mini_repeat, self.unique, self.repeat = num_rows, mini_repeat, unique, repeat
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist() if self.shuffle else range(self.num_rows)
        for start in range(0, self.num_rows - self.unique + 1, self.unique):
            chunk = order[start:start + self.unique]
            for _ in range(self.repeat):
                for index in chunk:
                    yield from [index] * self.mini_repeat

    def __len__(self) -> int:
        return (self.num_rows // self.unique) * self.unique * self.mini_repeat * self.repeat
