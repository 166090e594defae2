"""Ctrl-C (SIGINT) or SIGTERM during `train()`: finish the current optimizer step, save a checkpoint, stop cleanly.

While `train()` runs in the main thread, the first SIGINT or SIGTERM (what schedulers send before preempting a
job) only sets a flag (and says so on stderr); at the end of the current optimizer step the trainer saves a
checkpoint (whatever `save_strategy` says), stops, and `train()` raises `TrainingInterrupted` — a
`KeyboardInterrupt` whose message names the checkpoint — so a script stops as it would on Ctrl-C, and the CLI
exits with status 128 + the signal number (130 for Ctrl-C) after printing that one line. A second signal of the
same kind gets the previous handler back first, so it acts at once (for a step that hangs). With several processes
the flag is summed over them at each step end, so all stop at the same step.

Not here: how checkpoints are written (`trainers/checkpoints.py`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import weakref
from typing import Any

import torch
from transformers import TrainerCallback


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `train()` after Ctrl-C once the checkpoint is saved; `.checkpoint` is its path, `.step` the step."""

    def __init__(self, step: int, checkpoint: str | None, signum: int = signal.SIGINT):
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)
        how = "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"
        if checkpoint:
            message = (f"{how} at step {step}; checkpoint saved to {checkpoint} (continue with "
                       f"--resume_from_checkpoint {checkpoint})")
        else:
            message = f"{how} at step {step}; no checkpoint could be saved"
        super().__init__(message)


class GracefulInterrupt:
    """Mixin for `transformers.Trainer` subclasses; see the module docstring."""

    _interrupt_requested = False
    _interrupt_signal = signal.SIGINT

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(_StopOnInterrupt(self))

    def train(self, *args: Any, **kwargs: Any):
        self._interrupt_requested = False
        with self._signals_set_flag():
            output = super().train(*args, **kwargs)
        if self._interrupt_requested:
            raise TrainingInterrupted(self.state.global_step, getattr(self, "last_checkpoint", None),
                                      self._interrupt_signal)
        return output

    @contextlib.contextmanager
    def _signals_set_flag(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum, frame):
            if not self._interrupt_requested:
                self._interrupt_requested, self._interrupt_signal = True, signum
            signal.signal(signum, previous[signum])  # the same signal again acts at once
            if self.is_world_process_zero():
                again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                print(f"\nposttrain: {signal.Signals(signum).name} received; saving a checkpoint after this step "
                      f"({again} again to stop at once)", file=sys.stderr, flush=True)

        for signum in previous:
            signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _interrupt_agreed(self) -> bool:
        requested = self._interrupt_requested
        if self.args.world_size > 1:
            flag = torch.tensor(float(requested), device=self.args.device)
            requested = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
            self._interrupt_requested = requested
        return requested


class _StopOnInterrupt(TrainerCallback):
    def __init__(self, trainer: GracefulInterrupt):
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and trainer._interrupt_agreed():
            control.should_save = True
            control.should_training_stop = True
        return control
