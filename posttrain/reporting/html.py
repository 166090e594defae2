"""`report.html`: one self-contained page per run — facts, a first/last/best metric table, the plots (PNG files
embedded as base64, so the page can be mailed or attached to an issue), the last completions of an online run,
and the resolved config. No JavaScript, no external files. Also `pipeline_page` for a pipeline's top-level page
linking its stages' reports.

Not here: computing the summaries (`summary.py`), drawing (`plots.py`).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from typing import Any

from posttrain.reporting.summary import fmt

_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;white-space:pre-wrap;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{width:540px;border:1px solid #eee}
pre{white-space:pre-wrap;margin:0;font-size:.85em}.muted{color:#777}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


class _Html(str):
    """A table cell that is already HTML (an <img> of a prompt's image), written unescaped."""


_DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def _image_cell(value: Any) -> str:
    """A PNG data URI (image prompts' thumbnails in completions.jsonl) as an <img>; anything else as text."""
    if isinstance(value, str) and _DATA_URI.fullmatch(value):
        return _Html(f'<img alt="image" src="{value}" style="width:64px;image-rendering:pixelated">')
    return _cell(value)


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)

    def text(c):
        return c if isinstance(c, _Html) else _e(c)

    body = "".join("<tr>" + "".join(f'<td class="n">{text(c)}</td>' if i >= numeric_from else f"<td>{text(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _facts(facts: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())
    return f"<table>{rows}</table>"


def _image(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    name = os.path.splitext(os.path.basename(path))[0]
    return f'<img alt="{_e(name)}" title="{_e(name)}" src="data:image/png;base64,{data}">'


def _page(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")


def run_page(title: str, facts: dict[str, Any], summary: list[dict[str, Any]], plot_paths: list[str],
             config: dict[str, Any], completions: list[dict[str, Any]] | None = None,
             plots_note: str | None = None) -> str:
    """The HTML of one run's report."""
    sections = [_facts(facts)]
    sections.append("<h2>Metrics</h2>")
    if summary:
        sections.append(_table(["metric", "first", "last", "best", "logged"],
                               [[r["metric"], fmt(r["first"]), fmt(r["last"]), fmt(r["best"]), r["count"]]
                                for r in summary]))
    else:
        sections.append('<p class="muted">No metrics were logged.</p>')
    sections.append("<h2>Curves</h2>")
    if plot_paths:
        sections.append('<div class="plots">' + "".join(_image(p) for p in plot_paths) + "</div>")
    else:
        sections.append(f'<p class="muted">{_e(plots_note or "No plots.")}</p>')
    if completions:
        keys = [k for k in completions[0] if k not in ("prompt", "completion", "image")]
        image = ["image"] if "image" in completions[0] else []  # image prompts: the image first
        rows = [[_image_cell(c.get("image")) for _ in image] + [_prompt_text(c.get("prompt")),
                                                                 _completion_text(c.get("completion", ""))]
                + [_cell(c.get(k)) for k in keys]
                for c in completions]
        sections.append(f"<h2>Last {len(completions)} completions</h2>")
        sections.append(_table(image + ["prompt", "completion"] + keys, rows, numeric_from=2 + len(image)))
    sections.append("<h2>Resolved config</h2>")
    sections.append(_table(["option", "value"], [[k, _cell(v)] for k, v in sorted(config.items())], numeric_from=9))
    return _page(title, sections)


def pipeline_page(title: str, facts: dict[str, Any], stages: list[dict[str, Any]], columns: list[str],
                  plot_paths: list[str] = (), side_by_side: list[tuple[str, list[str], list[list[str]]]] = ()) -> str:
    """A pipeline's page: one row per stage (its figures and a link to its own report.html, relative), then
    `side_by_side` tables (title, header, rows): the same prompts answered by each stage's model."""
    head = "".join(f"<th>{_e(c)}</th>" for c in ["stage"] + columns + ["report"])
    rows = []
    for stage in stages:
        cells = [f"<td>{_e(stage['name'])}</td>"] + [f'<td class="n">{_e(stage.get(c, "—"))}</td>' for c in columns]
        link = stage.get("report")
        cells.append(f'<td><a href="{_e(link)}">{_e(link)}</a></td>' if link else "<td>—</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    sections = [_facts(facts), "<h2>Stages</h2>",
                f"<table><tr>{head}</tr>{''.join(rows)}</table>"]
    if plot_paths:
        sections.append('<h2>Across stages</h2><div class="plots">' + "".join(_image(p) for p in plot_paths)
                        + "</div>")
    for heading, header, table_rows in side_by_side:
        cells = "".join(f"<th>{_e(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f'<td><pre>{_e(c)}</pre></td>' for c in row) + "</tr>" for row in table_rows)
        sections.append(f"<h2>{_e(heading)}</h2><table><tr>{cells}</tr>{body}</table>")
    return _page(title, sections)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # conversational: the last message is what was asked
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def _completion_text(completion: Any) -> str:
    """A completion as text; a multi-turn one shows every turn, tool turns marked `[tool name] …`."""
    if not isinstance(completion, list):
        return "" if completion is None else str(completion)
    lines = []
    for m in completion:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            lines.append(f"[tool {m.get('name', '')}] {m.get('content', '')}")
        else:
            lines.append(str(m.get("content") or ""))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)
