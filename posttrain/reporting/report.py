"""What a run leaves in output_dir, from a trainer: `metrics.jsonl` (as it runs), `plots/*.png` and
`report.html` (at the end of training), and the model card `README.md` (whenever the model is saved).

`RunReport` is the callback (main process only); `write_report` and `write_model_card` can also be called
directly — a pipeline calls them again after its own evaluation to add held-out figures (`extra`).
Not here: the file formats themselves (`metrics_log.py`, `plots.py`, `html.py`, `model_card.py`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
import weakref
from typing import Any

from transformers import TrainerCallback

from posttrain.reporting import html, metrics_log, model_card, plots, summary
from posttrain.reporting.atomic import write_text

logger = logging.getLogger(__name__)
REPORT = "report.html"
MODEL_CARD = "README.md"
COMPLETIONS = "completions.jsonl"
COMPLETION_ROWS = 16


class RunReport(TrainerCallback):
    """metrics.jsonl during training; plots and report.html when it ends. The file is rewritten from the log
    history at the first event of a `train()` call (not at its start: a run that fails at once leaves an earlier
    run's file alone), so a resumed run continues its checkpoint's rows."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)
        self._pending = False
        self._start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._pending, self._start = True, time.time()

    def _sync(self, args, state) -> bool:
        """Rewrite the file from the history if this train() call has not yet; True when it did."""
        if not self._pending:
            return False
        self._pending = False
        metrics_log.rewrite(args.output_dir, state.log_history)
        return True

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._sync(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self._sync(args, state):
            return
        elapsed = time.time() - self._start if self._start is not None else None
        metrics_log.append(args.output_dir, metrics_log.record(logs, state.global_step, state.epoch, elapsed))

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if state.is_world_process_zero and trainer is not None:
            self._sync(args, state)
            write_report(trainer)


def run_facts(trainer) -> dict[str, Any]:
    """Method, base model, data set, steps, runtime: the lines both the report and the model card show."""
    state = trainer.state
    runtime = next((h["train_runtime"] for h in reversed(state.log_history) if "train_runtime" in h), None)
    facts = {"method": trainer.method_name, "base model": base_model(trainer) or "unknown",
             "data set": dataset_name(trainer) or "unknown", "output_dir": trainer.args.output_dir,
             "steps": f"{state.global_step} of {state.max_steps}"}
    if state.epoch is not None:
        facts["epochs"] = f"{state.epoch:.2f}"
    if runtime is not None:
        facts["training time"] = f"{runtime:.0f} s"
    return facts


def base_model(trainer) -> str | None:
    """The model the run started from, as the user named it (a built-in name rather than its cache path)."""
    extra = getattr(trainer, "run_config_extra", {}) or {}
    name = extra.get("model_name_or_path") or getattr(trainer, "_report_base_model", None)
    if name:
        from posttrain.models import builtin

        root = os.path.abspath(builtin.cache_dir())
        if os.path.dirname(os.path.abspath(name)).startswith(root):  # …/models/posttrain--tiny → posttrain/tiny
            guess = os.path.basename(os.path.abspath(name)).replace("--", "/", 1)
            name = guess if builtin.is_builtin_model(guess) else name
    return name


def dataset_name(trainer) -> str | None:
    extra = getattr(trainer, "run_config_extra", {}) or {}
    if extra.get("dataset_name"):
        return str(extra["dataset_name"])
    if extra.get("datasets"):
        return ", ".join(dict.fromkeys(str(d.get("path", d)) if isinstance(d, dict) else str(d)
                                       for d in extra["datasets"]))  # each data set once
    info = getattr(trainer.train_dataset, "info", None)
    return getattr(info, "dataset_name", None) or None


def resolved_config(trainer) -> dict[str, Any]:
    flat = trainer.args.to_flat_dict() if hasattr(trainer.args, "to_flat_dict") else trainer.args.to_dict()
    return {**(getattr(trainer, "run_config_extra", {}) or {}), **flat}


def last_completions(output_dir: str, count: int = COMPLETION_ROWS) -> list[dict[str, Any]]:
    path = os.path.join(output_dir, COMPLETIONS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = collections.deque((line for line in f if line.strip()), maxlen=count)
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written while we read
    return rows


def write_report(trainer, extra: dict[str, Any] | None = None) -> str:
    """Draw the plots and write output_dir/report.html; `extra` adds lines to the facts table."""
    start = time.time()
    output_dir = trainer.args.output_dir
    rows = trainer.state.log_history
    plot_paths = plots.render(summary.series(rows), output_dir)
    note = None if plots.matplotlib_available() else "matplotlib is not installed (pip install 'posttrain[plots]')."
    facts = {**run_facts(trainer), **(extra or {})}
    page = html.run_page(f"posttrain {trainer.method_name} run — {os.path.basename(os.path.abspath(output_dir))}",
                         facts, summary.summarise(rows), plot_paths, resolved_config(trainer),
                         last_completions(output_dir), plots_note=note)
    path = write_text(os.path.join(output_dir, REPORT), page)
    logger.debug("report written in %.2fs", time.time() - start)
    return path


def write_model_card(trainer, output_dir: str | None = None, extra: dict[str, float] | None = None,
                     tags: list[str] | None = None, evaluation: list[str] | None = None) -> str:
    """Write output_dir/README.md (the model card) with the final metrics (plus `extra`, e.g. held-out figures,
    and `evaluation`, markdown lines for a "Held-out evaluation" section); tags default to the trainer's."""
    output_dir = output_dir or trainer.args.output_dir
    facts = {k: v for k, v in run_facts(trainer).items() if k in ("steps", "epochs", "training time")}
    final = summary.final_metrics(trainer.state.log_history)
    final.update(extra or {})
    text = model_card.render(method=trainer.method_name, model_name=output_dir, base_model=base_model(trainer),
                             dataset=dataset_name(trainer), final=final, facts=facts,
                             is_classifier=_is_classifier(trainer.model),
                             tags=tags if tags is not None else _tags(trainer), evaluation=evaluation)
    return write_text(os.path.join(output_dir, MODEL_CARD), text)


def _tags(trainer) -> list[str] | None:
    names = getattr(trainer, "tag_names", None)
    return names() if callable(names) else None


def _is_classifier(model) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()  # PEFT wraps the classifier
    return "ForSequenceClassification" in type(base).__name__
