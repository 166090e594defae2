"""A pipeline's per-stage figures: the key metric of each command, the line printed after a stage, the table
printed at the end, `pipeline_summary.json` and the top-level `report.html` linking each stage's own report.

Not here: running stages (`run.py`), a single run's report (`reporting/`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from posttrain.reporting import html, plots
from posttrain.reporting.atomic import write_text
from posttrain.reporting.summary import fmt, series

SUMMARY_JSON = "pipeline_summary.json"
REPORT = "report.html"
# command → candidate (metric, label), first present wins: held-out figures before training ones
KEY_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("eval_mean_token_accuracy", "held-out token accuracy"), ("mean_token_accuracy", "token accuracy")),
    "reward": (("eval_accuracy", "held-out pair accuracy"), ("accuracy", "pair accuracy")),
    "dpo": (("eval_rewards/accuracies", "held-out reward accuracy"), ("rewards/accuracies", "reward accuracy")),
    "orpo": (("eval_rewards/accuracies", "held-out reward accuracy"), ("rewards/accuracies", "reward accuracy")),
    "cpo": (("eval_rewards/accuracies", "held-out reward accuracy"), ("rewards/accuracies", "reward accuracy")),
    "kto": (("eval_rewards/margins", "held-out reward margin"), ("rewards/margins", "reward margin")),
    "grpo": (("reward", "reward"),),
    "rloo": (("reward", "reward"),),
    "ppo": (("objective/scores", "score"), ("reward", "reward")),
    "online_dpo": (("objective/scores", "score"), ("reward", "reward")),
}


def key_metric(command: str, log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{"metric", "label", "first", "last"} of the command's key metric in a run's log history, or None."""
    curves = series(log_history)
    for metric, label in KEY_METRICS.get(command, (("loss", "loss"),)):
        points = curves.get(metric)
        if points:
            return {"metric": metric, "label": label, "first": points[0][1], "last": points[-1][1]}
    return None


def on_subset(record: dict[str, Any]) -> str:
    """", first 300 prompts" when the sampled answers covered fewer questions than the greedy ones, else ""."""
    subset = record.get("sampled_prompts")
    return f", first {subset} prompts" if subset is not None and subset < record.get("num_prompts", subset) else ""


def describe(record: dict[str, Any]) -> str:
    """'held-out answer accuracy 0.415 · held-out pair accuracy 0.55 → 0.68' for one stage record."""
    parts = []
    if record.get("answer_accuracy") is not None:
        parts.append(f"held-out answer accuracy {record['answer_accuracy']:.3f} ({record['num_prompts']} prompts, "
                     "greedy)")
    if record.get("sampled_accuracy") is not None:
        parts.append(f"{record['sampled_accuracy']:.3f} sampled (T={record['sampling_temperature']:g}, "
                     f"{record['samples_per_prompt']} per prompt{on_subset(record)})")
    if record.get("versus"):
        parts.append(f"vs {versus(record['versus'])}")
    if record.get("versus_sampled"):
        parts.append(f"sampled vs {versus(record['versus_sampled'], SAMPLED_WORDS)}")
    if record.get("drift_kl") is not None:
        parts.append(f"KL from start {record['drift_kl']:.2f} ± {record['drift_kl_stderr']:.2f} nats/answer "
                     f"({record['drift_prompts']} other chat prompts)")
    if record.get("pairs") is not None:
        parts.append(f"{record['pairs']} preference pairs from {record['pair_prompts']} prompts")
    key = record.get("key_metric")
    if key:
        parts.append(f"{key['label']} {fmt(key['first'])} → {fmt(key['last'])}")
    return " · ".join(parts) or "no figures"


def versus(comparison: dict[str, Any], words: tuple[str, str] = ("right", "wrong")) -> str:
    """'sft: +31 right / −9 wrong (p=0.0007)': the questions this stage fixed and broke against its start model
    (sampled scores: `words` ("higher", "lower"))."""
    return (f"{comparison['stage']}: +{comparison['fixed']} {words[0]} / −{comparison['broken']} {words[1]} "
            f"(p={comparison['p_value']:.2g})")


SAMPLED_WORDS = ("higher", "lower")  # a question's mean score over its samples went up / down
COLUMNS = ("stage", "command", "time", "answer acc", "sampled acc", "vs start (greedy, McNemar p)",
           "vs start (sampled, sign test p)", "KL from start", "key metric")


def _row(record: dict[str, Any]) -> list[str]:
    key = record.get("key_metric")
    return [record["name"], record.get("command") or "—",
            f"{record['seconds']:.0f}s" if record.get("seconds") is not None else "—",
            f"{record['answer_accuracy']:.3f}" if record.get("answer_accuracy") is not None else "—",
            f"{record['sampled_accuracy']:.3f}" if record.get("sampled_accuracy") is not None else "—",
            versus(record["versus"]) if record.get("versus") else "—",
            versus(record["versus_sampled"], SAMPLED_WORDS) if record.get("versus_sampled") else "—",
            f"{record['drift_kl']:.2f}" if record.get("drift_kl") is not None else "—",
            f"{key['label']} {fmt(key['first'])} → {fmt(key['last'])}" if key else "—"]


def table(records: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per stage (and the starting model)."""
    rows = [list(COLUMNS)] + [_row(r) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def side_by_side(records: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The same prompts answered by each evaluated stage: held-out task questions (the evaluation's first three,
    with their reward) and, when the drift check ran, three chat prompts outside the task."""
    tables = []
    for key, title, scored in (("examples", "Held-out questions, answered after each stage", True),
                               ("chat_examples", "Other chat prompts, answered after each stage (greedy)", False)):
        shown = [r for r in records if r.get(key)]
        if not shown:
            continue
        rows = []
        for i, first in enumerate(shown[0][key]):
            cells = [str(first[0])]
            for record in shown:
                example = record[key][i] if i < len(record[key]) else ["", "—", ""]
                cells.append(f"{example[1]}" + (f"\n(reward {example[2]})" if scored else ""))
            rows.append(cells)
        tables.append((title, ["prompt"] + [r["name"] for r in shown], rows))
    return tables


def write(output_dir: str, pipeline_path: str, records: list[dict[str, Any]], seconds: float) -> dict[str, str]:
    """pipeline_summary.json and report.html in output_dir; returns their paths."""
    data = {"pipeline": pipeline_path, "output_dir": output_dir, "total_seconds": round(seconds, 1),
            "stages": records}
    json_path = write_text(os.path.join(output_dir, SUMMARY_JSON), json.dumps(data, indent=2, default=str) + "\n")
    stages = []
    for record in records:
        cells = dict(zip(COLUMNS[1:], _row(record)[1:]))
        report = os.path.join(record["output_dir"], "report.html") if record.get("output_dir") else None
        if report and os.path.isfile(report):
            cells["report"] = os.path.relpath(report, output_dir)
        stages.append({"name": record["name"], **cells})
    facts = {"pipeline": pipeline_path, "output_dir": output_dir, "total time": f"{seconds:.0f} s",
             "answer accuracy": "greedy decoding on held-out prompts, scored by accuracy_reward",
             "sampled accuracy": "mean over samples at the evaluation's sampling temperature (when asked)",
             "KL from start": "KL(starting model ‖ stage) in nats per answer, estimated on the starting model's own "
                              "sampled answers to prompts outside the task (when drift_dataset is set)"}
    charts = []
    for key, title in (("answer_accuracy", "held-out answer accuracy (greedy) after each stage"),
                       ("sampled_accuracy", "held-out answer accuracy (sampled) after each stage"),
                       ("drift_kl", "KL(start ‖ stage) on prompts outside the task, nats per answer")):
        scored = [r for r in records if r.get(key) is not None]
        chart = scored and plots.render_bars([r["name"] for r in scored], [r[key] for r in scored],
                                             os.path.join(output_dir, f"{key}.png"), title)
        charts += [chart] if chart else []
    page = html.pipeline_page(f"posttrain pipeline — {os.path.basename(pipeline_path)}", facts, stages,
                              list(COLUMNS[1:]), charts, side_by_side(records))
    html_path = write_text(os.path.join(output_dir, REPORT), page)
    return {"json": json_path, "html": html_path}
