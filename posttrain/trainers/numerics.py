"""Non-finite losses, gradients and weights, mixed into `PostTrainer`.

Before each optimizer update the guard checks whether any micro-batch loss of the accumulated step, or any
gradient, is NaN or infinite. If so the update is skipped — every gradient is set to None, which every torch
optimizer (and transformers' Adafactor, bitsandbytes' 8-bit optimizers) reads as "leave this parameter and its
optimizer state alone", so no weight and no Adam moment changes — and the step is counted: a warning per skipped
step, `nonfinite_skipped` (the run's total) in the logs from the first skip on. The learning-rate schedule still
advances, so step N keeps step N's learning rate. After `max_nonfinite_steps` skipped steps in a row the run stops
with `NonFiniteError` (one line); the weights are still the last good ones and checkpoints already written are
untouched. With fp16 and a gradient scaler, overflowing gradients are the scaler's business (it skips those steps
and lowers the scale), so only the loss is checked. Under DeepSpeed the engine owns the gradients and the step:
only the loss is checked and the update cannot be skipped, but it is still counted and the streak still stops.

`save_model` (the final model and every checkpoint) refuses to write weights that hold NaN or inf.

Not here: where checkpoints go (`trainers/checkpoints.py`); NaN rewards (`rewards/runner.py`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from posttrain.errors import NonFiniteError

logger = logging.getLogger(__name__)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and inf: one fused norm per device and one sync (a per-tensor isfinite
    costs a kernel launch each). A norm overflows to inf only for values near the dtype's maximum — broken anyway."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(tensor.detach())
    totals = []
    for group in by_device.values():
        norms = torch._foreach_norm(group) if hasattr(torch, "_foreach_norm") else [t.norm() for t in group]
        totals.append(torch.stack([n.float() for n in norms]).sum().cpu())
    return not totals or bool(torch.isfinite(torch.stack(totals)).all())


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding NaN or inf, or None when all are finite."""
    named = list(model.named_parameters())
    if _all_finite([p for _, p in named]):
        return None
    return next((name for name, p in named if p.numel() and not bool(torch.isfinite(p.detach()).all())), None)


def gradients_are_finite(model: torch.nn.Module) -> bool:
    return _all_finite([p.grad for p in model.parameters() if p.grad is not None])


class NonFiniteGuard:
    """Mixin for `transformers.Trainer` subclasses; see the module docstring. Needs `args.max_nonfinite_steps`
    (0 = skip bad updates but never stop)."""

    _nonfinite_total = 0  # skipped updates in this run (restored on resume)
    _nonfinite_streak = 0  # skipped updates in a row
    _nonfinite_loss = False  # a micro-batch of the current accumulated step had a non-finite loss

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(_SkipNonFiniteUpdates(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True
        return loss

    def _check_update(self, model: torch.nn.Module) -> None:
        """Called before each optimizer step: skip the update (and maybe stop) when the loss or a gradient is bad."""
        bad_loss, self._nonfinite_loss = self._nonfinite_loss, False
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        scaler_handles_grads = getattr(self.accelerator, "scaler", None) is not None
        bad = bad_loss or (not (scaler_handles_grads or deepspeed) and not gradients_are_finite(model))
        if self.args.world_size > 1:  # every process must take the same decision
            flag = torch.tensor(float(bad), device=self.args.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        if not bad:
            self._nonfinite_streak = 0
            return
        for param in model.parameters():
            param.grad = None
        self._nonfinite_total += 1
        self._nonfinite_streak += 1
        step, limit = self.state.global_step + 1, self.args.max_nonfinite_steps
        what = "loss" if bad_loss else "gradient"
        logger.warning("Step %d: non-finite %s; the optimizer update was %s (%d in a row%s).", step, what,
                       "applied (DeepSpeed steps itself)" if deepspeed else "skipped", self._nonfinite_streak,
                       f", the run stops at {limit}" if limit else "")
        if limit and self._nonfinite_streak >= limit:
            where = f"; the last checkpoint is {self.last_checkpoint}" if getattr(self, "last_checkpoint", None) \
                else ""
            raise NonFiniteError(
                f"{self._nonfinite_streak} optimizer steps in a row had a non-finite {what} (up to step {step}){where}"
                "; lower learning_rate, set max_grad_norm, check the data for empty or extreme rows, or raise "
                "max_nonfinite_steps.")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._nonfinite_total and not any(k.startswith("eval_") for k in logs):
            logs["nonfinite_skipped"] = self._nonfinite_total
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' save_model, refusing weights that hold NaN or inf."""
        bad = first_nonfinite_parameter(self.model)
        if bad is not None:
            raise NonFiniteError(f"refusing to save the model to {output_dir or self.args.output_dir!r}: parameter "
                                 f"{bad!r} holds NaN or inf; resume from the last checkpoint with a lower "
                                 "learning_rate or max_grad_norm set.")
        super().save_model(output_dir, _internal_call)


class _SkipNonFiniteUpdates(TrainerCallback):
    def __init__(self, trainer: NonFiniteGuard):
        self._trainer = weakref.ref(trainer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._check_update(trainer.model if model is None else model)
