"""A concise progress display: one tqdm bar (steps, elapsed, ETA) whose postfix shows the key metrics of the last
log event (`loss 0.41 · acc 0.93 · lr 2e-3`), one compact line per log event above the bar, and one line per
evaluation (`eval @ 100: loss 0.52 · acc 0.89`).

It replaces transformers' `ProgressCallback`, which prints every log as a full dict. `disable_tqdm=True` keeps
transformers' plain `PrinterCallback` (no bar). Not here: files (`metrics_log.py`, `report.py`).
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from posttrain.reporting.summary import fmt

# (metric, short label) in display order; the first metric found for a label wins (acc = whichever accuracy)
KEY_METRICS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("accuracy", "acc"), ("mean_token_accuracy", "acc"),
               ("rewards/margins", "margin"), ("margin", "margin"), ("reward", "reward"),
               ("objective/scores", "score"), ("kl", "kl"), ("objective/kl", "kl"),
               ("completions/mean_length", "len"), ("tools/call_frequency", "tools"),
               ("tools/failures", "tool errors"), ("turns/mean", "turns"), ("entropy", "entropy"),
               ("learning_rate", "lr"))


def key_metrics_line(logs: dict[str, Any], prefix: str = "") -> str:
    """'loss 0.41 · acc 0.93 · lr 2e-3' from a log dict (eval logs: prefix='eval_')."""
    parts, seen = [], set()
    for key, label in KEY_METRICS:
        value = logs.get(prefix + key)
        if label in seen or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        seen.add(label)
        parts.append(f"{label} {fmt(float(value))}")
    return " · ".join(parts)


class ConciseProgress(TrainerCallback):
    """The training bar and the eval bar; attribute names match transformers' ProgressCallback (`training_bar`,
    `prediction_bar`) so code that closes those bars on failure keeps working."""

    def __init__(self):
        self.training_bar = None
        self.prediction_bar = None
        self.current_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, unit="step")
            self.training_bar.update(state.global_step)  # resumed runs start where they left off
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(total=len(eval_dataloader), leave=self.training_bar is None,
                                           dynamic_ncols=True, desc="eval")
            self.prediction_bar.update(1)

    def _close_prediction_bar(self):
        if self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # the closing summary is the CLI's line
        write = self.training_bar.write if self.training_bar is not None else tqdm.write
        if any(k.startswith("eval_") for k in logs):
            line = key_metrics_line(logs, "eval_") or ", ".join(f"{k} {fmt(v)}" for k, v in logs.items()
                                                                 if isinstance(v, float))
            write(f"eval @ {state.global_step}: {line}")
            return
        line = key_metrics_line(logs)
        if not line:
            return
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(line, refresh=True)
        of_total = f"/{state.max_steps}" if state.max_steps else ""  # no total outside train() (PPO's step loop)
        write(f"step {state.global_step}{of_total}: {line}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None
