"""`RolloutBatches`, a mixin of `OnlineTrainer`: a scored rollout → micro-batches (`advantage_batches`, `split`)
grouped into optimizer steps and repeated per pass (`cycle`), each carrying its step's item counts
(`with_item_counts`) for the one reduction contract (`reduce_loss`, `losses/reduce.py`) — which also lets a
micro-batch run forward and backward in row slices of at most `max_tokens_per_backward` tokens (`backward_slices`).

Not here: the reduction maths (`losses/reduce.py`), advantages (`algorithms/advantages.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.losses.reduce import global_sum_reduce, local_reduce
from posttrain.rollout.types import Rollout
from posttrain.trainers.slices import token_slices


class RolloutBatches:
    """Micro-batches and loss normalisers of an `OnlineTrainer` (its `args`, `model`, `accelerator`)."""

    def backward_slices(self, inputs, budget: int):
        """`max_tokens_per_backward` (GRPO, RLOO): a micro-batch of rollout rows as row slices (`trainers/slices.py`);
        exact through the reduction contract. None (run whole) for anything but a list of rollout rows."""
        return token_slices(self._prepare_inputs(inputs), budget) if isinstance(inputs, list) else None

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(N, …) per-row values of this process → (N_all, …) of the whole generation batch in global row order
        (training with several processes; else unchanged)."""
        if self.accelerator.num_processes == 1 or not self.model.training:
            return values
        return self.accelerator.gather(values.contiguous())

    def advantage_batches(self, rollout: Rollout, advantages: torch.Tensor,
                          **extra: torch.Tensor) -> list[list[dict[str, torch.Tensor]]]:
        """Per-completion advantages (N_all,) over the gathered generation batch → this process's rows, shuffled into
        micro-batches grouped into optimizer steps, the same micro-batches for each of the num_iterations passes.
        `extra`: more per-row tensors (N, …) of this process's rows to carry along (e.g. GRPO's sampler weights)."""
        if self.accelerator.num_processes > 1 and self.model.training:
            n = len(rollout.prompts)
            advantages = advantages[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
        rollout.advantages = advantages
        return self.cycle(self.split({**self.rollout_tensors(rollout), "advantages": advantages, **extra}))

    def split(self, batch: dict[str, torch.Tensor], group: int = 1) -> list[dict[str, torch.Tensor]]:
        """One pass over a batch in micro-batches of per_device_train_batch_size rows, shuffled in units of `group`
        consecutive rows (training), or one micro-batch of every row (evaluation)."""
        n = batch["input_ids"].shape[0]
        if not self.model.training:
            return [dict(batch)]
        device = batch["input_ids"].device
        order = torch.randperm(n // group, device=device)
        order = (order.unsqueeze(1) * group + torch.arange(group, device=device)).reshape(-1)
        size = self.args.per_device_train_batch_size
        return [{k: v[order[start:start + size]] for k, v in batch.items()} for start in range(0, n, size)]

    def cycle(self, parts: list[dict[str, torch.Tensor]]) -> list[list[dict[str, torch.Tensor]]]:
        """The micro-batches of one pass, grouped into optimizer steps of gradient_accumulation_steps each and
        repeated for num_iterations passes (one step, one pass in evaluation)."""
        if not self.model.training:
            return [parts]
        ga = self.args.gradient_accumulation_steps
        return [parts[i:i + ga] for i in range(0, len(parts), ga)] * self.args.num_iterations

    # ---- item counts and the reduction --------------------------------------------------------------------
    @staticmethod
    def count_items(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss items of one micro-batch by unit: trained tokens, sequences (rows), ranked pairs."""
        counts = {"token": part["completion_mask"].sum().float(),
                  "sequence": torch.tensor(float(part["completion_mask"].shape[0]),
                                           device=part["completion_mask"].device)}
        if "pair_weight" in part:
            counts["pair"] = part["pair_weight"].sum().float()
        return counts

    def with_item_counts(self, steps: list[list[dict[str, torch.Tensor]]]) -> list[list[dict[str, torch.Tensor]]]:
        """Each micro-batch gets `local_items` (its own counts) and `num_items` (its optimizer step's counts over
        every micro-batch and process: one collective per cycle); the steps are returned. A step of a generation batch
        whose steps_per_generation is not a multiple of gradient_accumulation_steps straddles two cycles: there
        the cycle's count × GA / steps_per_generation stands in for the step's (TRL's normaliser)."""
        args = self.args
        units = sorted(self.count_items(steps[0][0]))
        local = [[self.count_items(part) for part in step] for step in steps]
        totals = torch.stack([torch.stack([sum(c[u] for c in step) for u in units]) for step in local])
        if args.world_size > 1 and self.model.training:
            totals = self.accelerator.reduce(totals, reduction="sum")
        if self.model.training and args.steps_per_generation % args.gradient_accumulation_steps != 0:
            cycle = args.steps_per_generation * args.num_iterations
            totals = totals.sum(0, keepdim=True).expand(len(steps), -1) * args.gradient_accumulation_steps / cycle
        for step, counts, total in zip(steps, local, totals):
            for part, own in zip(step, counts):
                part["local_items"] = own
                part["num_items"] = dict(zip(units, total))
        return steps

    def reduce_loss(self, terms: torch.Tensor, unit: str, inputs: dict[str, Any], local: bool = False):
        """The micro-batch's share of its optimizer step's loss: Σ terms · processes / (the step's `unit` items,
        all micro-batches and processes). local=True: Σ terms / (this micro-batch's items) / GA (TRL's
        per-micro-batch normalisation, for the parity switch). Called directly on one batch (no counts): its own."""
        counts = inputs.get("num_items") or self.count_items(inputs)
        if local:
            own = inputs.get("local_items") or self.count_items(inputs)
            return local_reduce(terms, own[unit], self.args.gradient_accumulation_steps)
        processes = self.accelerator.num_processes if "num_items" in inputs else 1
        return global_sum_reduce(terms, counts[unit].clamp(min=1), processes)
