"""PNG plots of the curves that matter for a run, chosen by which metric keys the run logged.

Each panel lists candidate metrics; a panel is drawn when any of them (or its `eval_` twin) was logged, so SFT
gets loss / learning rate / token accuracy, preference methods also rewards/margins and rewards/accuracies, and
online RL reward / KL / completion length / entropy — with no per-trainer code. matplotlib is optional (the
`plots` extra): without it `render` logs one info line and returns no files. Uses matplotlib's object API
(no pyplot), so no global figure state and no GUI backend. Not here: choosing what the HTML shows (`html.py`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

# (file stem, title, candidate metrics — patterns may use a * wildcard)
PANELS = (
    ("loss", "loss", ("loss",)),
    ("reward", "reward", ("reward", "objective/scores", "rewards/*/mean")),
    ("accuracy", "accuracy", ("mean_token_accuracy", "accuracy")),
    ("rewards_accuracies", "rewards/accuracies", ("rewards/accuracies",)),
    ("rewards_margins", "rewards/margins", ("rewards/margins", "margin")),
    ("rewards_chosen_rejected", "rewards/chosen and rewards/rejected", ("rewards/chosen", "rewards/rejected")),
    ("kl", "KL to the reference", ("kl", "objective/kl")),
    ("completion_length", "completions/mean_length (tokens)", ("completions/mean_length",)),
    ("entropy", "entropy", ("entropy", "objective/entropy")),
    ("tools", "tool calls per completion and turns per rollout", ("tools/call_frequency", "turns/mean")),
    ("learning_rate", "learning rate", ("learning_rate",)),
)
PLOTS_DIR = "plots"
_warned = False


def _matches(pattern: str, names: list[str]) -> list[str]:
    if "*" not in pattern:
        return [pattern] if pattern in names else []
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", "[^/]+") + "$")
    return [n for n in names if regex.match(n)]


def choose_panels(metric_names: list[str]) -> list[tuple[str, str, list[str]]]:
    """[(stem, title, metrics to draw)] for the panels this run has data for (train names, without `eval_`)."""
    bases = sorted({n.removeprefix("eval_") for n in metric_names})
    chosen = []
    for stem, title, candidates in PANELS:
        keys = [k for pattern in candidates for k in _matches(pattern, bases)]
        if keys:
            chosen.append((stem, title, keys))
    return chosen


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(curves: dict[str, list[tuple[int, float]]], output_dir: str, title_prefix: str = "") -> list[str]:
    """Draw one PNG per chosen panel into output_dir/plots/; returns the paths written (none without matplotlib)."""
    global _warned
    panels = choose_panels(list(curves))
    if not panels:
        return []
    if not matplotlib_available():
        if not _warned:
            logger.info("matplotlib is not installed: no PNG plots (pip install 'posttrain[plots]'); "
                        "report.html still has the metric tables.")
            _warned = True
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from posttrain.reporting.atomic import write_bytes

    paths = []
    for stem, title, keys in panels:
        fig = Figure(figsize=(6.0, 3.4), dpi=100)  # fixed margins: a layout engine costs ~60% more per plot
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.15)
        ax = fig.add_subplot()
        for i, key in enumerate(keys):
            _draw(ax, curves, key, len(keys) > 1, f"C{i}")  # one colour per metric: train solid, eval dashed
        if len(keys) == 1 and keys[0].replace("_", " ") not in title.replace("_", " "):
            title = keys[0]  # the one metric drawn names itself (mean_token_accuracy, not "accuracy")
        ax.set_title(f"{title_prefix}{title}", fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if stem == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=8, loc="best")
        path = os.path.join(output_dir, PLOTS_DIR, f"{stem}.png")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        paths.append(write_bytes(path, buffer.getvalue()))
    return paths


def _draw(ax: Any, curves: dict[str, list[tuple[int, float]]], key: str, label_with_key: bool, color: str) -> None:
    name = key if label_with_key else ""
    train, evaluation = curves.get(key), curves.get(f"eval_{key}")
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, label=f"train {name}".strip(), linewidth=1.6, color=color,
                marker="." if len(train) < 30 else None)
    if evaluation:
        steps, values = zip(*evaluation)
        ax.plot(steps, values, label=f"eval {name}".strip(), linewidth=1.4, linestyle="--", marker="o", markersize=4,
                color=color, alpha=0.8 if train else 1.0)


def render_bars(labels: list[str], values: list[float], path: str, title: str) -> str | None:
    """One bar chart (e.g. a pipeline's answer accuracy per stage) as a PNG; None without matplotlib."""
    if not labels or not matplotlib_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from posttrain.reporting.atomic import write_bytes

    fig = Figure(figsize=(6.0, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.15)
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=9)
    ax.set_ylim(0, max(1.0, max(values) * 1.15))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_bytes(path, buffer.getvalue())
