"""Run reporting: what a training run shows while it runs and leaves behind in output_dir.

- `progress.py`   a concise progress bar (ETA, key metrics as `loss 0.41 · acc 0.93 · lr 2e-3`)
- `metrics_log.py` metrics.jsonl, one JSON object per log event
- `plots.py`      PNG curves chosen by which metrics exist (matplotlib optional)
- `html.py`       the self-contained report.html (and a pipeline's top-level page)
- `model_card.py` README.md next to the saved weights
- `report.py`     the callback tying them to a trainer, and `write_report` / `write_model_card`
- `rollouts.py`   an online rollout's metrics and completions table

`attach(trainer)` is the one call a trainer makes. Not here: the metrics themselves (trainers and losses).
"""

from __future__ import annotations

from posttrain.reporting.report import RunReport, write_model_card, write_report

__all__ = ["attach", "RunReport", "write_model_card", "write_report"]


def attach(trainer) -> None:
    """Add the run report to a `transformers.Trainer`, and swap transformers' dict-printing progress bar for the
    concise one (with `disable_tqdm=True` transformers' plain printer stays, and no bar is shown)."""
    from transformers.trainer_callback import ProgressCallback

    from posttrain.reporting.progress import ConciseProgress

    config = getattr(getattr(trainer.model, "get_base_model", lambda: trainer.model)(), "config", None)
    trainer._report_base_model = getattr(config, "_name_or_path", None) or None
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ConciseProgress)
    trainer.add_callback(RunReport(trainer))
