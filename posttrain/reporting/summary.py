"""Metric series from a run's log rows, and the first / last / best summary of each.

`series(rows)` turns metrics.jsonl rows (or `state.log_history`) into {metric: [(step, value), …]};
`summarise(rows)` gives one row per metric for the report's table and the model card. Which direction is "best"
is decided by the metric's name (losses and KL: lower; accuracies, rewards, margins, scores: higher; anything
else has no best). Not here: rendering (`html.py`, `plots.py`, `model_card.py`).
"""

from __future__ import annotations

import math
from typing import Any

# transformers' bookkeeping, not learning curves
_SKIP = {"step", "epoch", "time", "total_flos", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
_LOWER = ("loss", "kl", "clipfrac", "clip_ratio")
_HIGHER = ("accurac", "reward", "margin", "score", "chosen")


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), …]} for every numeric metric, in log order; None/NaN values are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(key, []).append((int(row.get("step", 0)), float(value)))
    return out


def direction(metric: str) -> str | None:
    """'min', 'max' or None (no natural best) for a metric name."""
    name = metric.removeprefix("eval_").lower()
    if (name.startswith("timing/") or name in ("learning_rate", "grad_norm", "num_tokens")
            or any(word in name for word in ("length", "std", "frac_"))):  # spreads and shares: no better side
        return None
    if any(word in name for word in _LOWER) and "rejected" not in name:
        return "min"
    if any(word in name for word in _HIGHER) and "rejected" not in name:
        return "max"
    return None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per metric: name, first, last, best (None when the metric has no direction), steps logged."""
    table = []
    for name, points in series(rows).items():
        values = [v for _, v in points]
        best_dir = direction(name)
        best = (min(values) if best_dir == "min" else max(values)) if best_dir else None
        table.append({"metric": name, "first": values[0], "last": values[-1], "best": best,
                      "count": len(values)})
    return sorted(table, key=lambda r: (r["metric"].startswith("eval_"), r["metric"]))


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every metric (train and eval)."""
    return {name: points[-1][1] for name, points in series(rows).items()}


def fmt(value: Any) -> str:
    """A short human-readable number: 0.413, 12.3, 0.002 → '2e-3', 12345 → '1.23e+4'."""
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, float):
        return str(value)
    if value == 0 or math.isnan(value):
        return "0" if value == 0 else "nan"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        text = f"{value:.2g}"
        if "e" not in text:  # e.g. 0.0083: %g keeps small values in fixed notation
            text = f"{value:.1e}"
        mantissa, exponent = text.split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
