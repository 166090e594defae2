"""`metrics.jsonl`: one JSON object per log event of a run — step, epoch, seconds since the start, and every
logged metric (train metrics plain, eval metrics with their `eval_` prefix), in the order they were logged.

Lines are appended as events happen, so the file can be tailed during a run. When training (re)starts the file
is rewritten from the trainer's log history first: a fresh run starts an empty file, a resumed run keeps exactly
the events up to its checkpoint. Not here: plotting and summaries (`plots.py`, `summary.py`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from posttrain.reporting.atomic import write_text

FILENAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (JSON has no NaN), tensors and numpy scalars become floats."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return str(value)


def record(logs: dict[str, Any], step: int, epoch: float | None, elapsed: float | None = None) -> dict[str, Any]:
    """The row written for one log event."""
    row: dict[str, Any] = {"step": step, "epoch": _clean(epoch)}
    if elapsed is not None:
        row["time"] = round(elapsed, 3)
    row.update({k: _clean(v) for k, v in logs.items() if k not in ("step", "epoch")})
    return row


def rewrite(output_dir: str, history: list[dict[str, Any]]) -> str:
    """Replace the file with `history` (the trainer's `state.log_history`), atomically."""
    lines = [json.dumps(record(h, h.get("step", 0), h.get("epoch"))) for h in history]
    return write_text(os.path.join(output_dir, FILENAME), "".join(line + "\n" for line in lines))


def append(output_dir: str, row: dict[str, Any]) -> None:
    """Add one row (a single write of one complete line)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, FILENAME), "a") as f:
        f.write(json.dumps(row) + "\n")


def read(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (or of output_dir/metrics.jsonl when given a directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
