"""How an online trainer's rows and rollouts are shaped outside the rollout itself: generation batches read from a
streamed dataset (`StreamedGenerationBatches`, the map-style `RepeatSampler`'s counterpart for
`datasets.IterableDataset`), and `pad_to_multiple` (TRL's pad_to_multiple_of on a `Rollout`).

Not here: the sampler of map-style datasets (`trainers/distributed.py`), generation (`rollout/hf.py`, engines).
"""

from __future__ import annotations

import torch

from posttrain.rollout.types import Rollout


class StreamedGenerationBatches(torch.utils.data.IterableDataset):
    """Generation batches read from a stream (TRL users stream large prompt sets with max_steps): `unique` prompts
    at a time in stream order, each repeated G times (groups consecutive), this process's slice of `per_process`
    rows, yielded once per micro-step of the cycle (`repeats`), as the map-style sampler does. A partial last
    batch is dropped (kept with `keep_partial`, for evaluation). Shuffling is the stream's own (e.g.
    `dataset.shuffle(buffer_size=...)`); each process reads the whole stream and keeps its slice, so a group is
    never split by sharding."""

    def __init__(self, dataset, num_generations: int, unique: int, per_process: int, repeats: int,
                 process_index: int = 0, keep_partial: bool = False):
        self.dataset, self.num_generations, self.unique = dataset, num_generations, unique
        self.per_process, self.repeats, self.process_index = per_process, repeats, process_index
        self.keep_partial = keep_partial  # evaluation: the last, smaller batch too
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # a shuffled stream reshuffles per epoch
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        prompts = []
        for row in self.dataset:
            prompts.append(row)
            if len(prompts) < self.unique:
                continue
            rows = [dict(row) for row in prompts for _ in range(self.num_generations)]
            start = self.process_index * self.per_process
            mine = rows[start:start + self.per_process]
            for _ in range(self.repeats):
                yield mine
            prompts = []
        if prompts and self.keep_partial:
            yield [dict(row) for row in prompts for _ in range(self.num_generations)]


def pad_to_multiple(rollout: Rollout, multiple: int | None, pad_id: int) -> None:
    """pad_to_multiple_of: prompt columns padded on the left and completion columns on the right (masks 0) to a
    multiple of `multiple`, so compiled kernels see few distinct shapes. In place; nothing when None."""
    if not multiple:
        return
    extra_prompt = -rollout.prompt_ids.shape[1] % multiple
    extra_completion = -rollout.completion_ids.shape[1] % multiple
    pad = torch.nn.functional.pad
    if extra_prompt:
        rollout.prompt_ids = pad(rollout.prompt_ids, (extra_prompt, 0), value=pad_id)
        rollout.prompt_mask = pad(rollout.prompt_mask, (extra_prompt, 0), value=0)
    if extra_completion:
        rollout.completion_ids = pad(rollout.completion_ids, (0, extra_completion), value=pad_id)
        rollout.completion_mask = pad(rollout.completion_mask, (0, extra_completion), value=0)
        rollout.loss_mask = pad(rollout.loss_mask, (0, extra_completion), value=0)
        if rollout.sampler_logps is not None:
            rollout.sampler_logps = pad(rollout.sampler_logps, (0, extra_completion), value=float("nan"))
