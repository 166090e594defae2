"""What an online rollout reports: the metrics TRL logs for a generation batch, and the completions table.

Pure functions of a scored `Rollout` (`rollout/types.py`); the online base (`trainers/online.py`) records them.
Not here: the metrics a method's loss records (its trainer), writing completions.jsonl (`OnlineTrainer.log`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain.algorithms.advantages import nan_mean_std
from posttrain.rollout.types import Rollout


def rollout_metrics(rollout: Rollout, runner, num_generations: int) -> dict[str, torch.Tensor | float]:
    """Completion lengths, clipped ratio, reward (and its group std when G > 1; groups may span processes, so it
    uses the gathered `group_rewards`), each function's mean/std, and the share of NaN a function returned."""
    lengths = rollout.completion_mask.sum(1).float()
    terminated = lengths[~rollout.is_truncated]
    rewards = rollout.rewards
    metrics = {
        "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(), "completions/clipped_ratio": rollout.is_truncated.float().mean(),
        "completions/mean_terminated_length": terminated.mean() if len(terminated) else torch.tensor(0.0),
    }
    if rollout.tool_calls is not None:  # multi-turn rollouts (`rollout/agentic.py`)
        calls = rollout.tool_calls.sum()
        metrics["tools/call_frequency"] = rollout.tool_calls.mean()  # tool calls per completion
        metrics["tools/failure_frequency"] = rollout.tool_failures.sum() / calls.clamp(min=1)  # failed / calls
        metrics["tools/failures"] = rollout.tool_failures.sum()  # failed calls in this rollout batch
        metrics["turns/mean"] = rollout.turns.mean()  # model turns per rollout
        metrics["turns/max"] = rollout.turns.max()
    if runner is None or rollout.scores is None:  # an unscored rollout (distillation)
        return metrics
    metrics["reward"] = rollout.scores.nanmean()
    if num_generations > 1:  # group statistics need siblings (PPO samples one completion per prompt)
        stds = nanstd(runner.weighted_sum(rollout.group_rewards).view(-1, num_generations))
        metrics["reward_std"] = stds.nanmean()
        metrics["frac_reward_zero_std"] = (stds < 1e-6).float().mean()
    for k, name in enumerate(runner.names):
        column = rewards[:, k]
        if not torch.isnan(column).all():
            metrics[f"rewards/{name}/mean"] = column.nanmean()
            metrics[f"rewards/{name}/std"] = nanstd(column.view(1, -1))[0]
        if runner.nan_totals[k]:  # NaN returned by a function (not None): see rewards/runner.py
            metrics[f"rewards/{name}/nan_frac"] = runner.last_nan_counts[k] / max(len(rewards), 1)
    return metrics


def completions_table(rollout: Rollout, names: list[str], step: int) -> list[dict[str, Any]]:
    """One row per completion: step, prompt, completion, each reward function's value and the advantage, the
    columns reward functions logged with `log_extra` (and, for multi-turn rollouts, the tool calls, failed calls and
    model turns)."""
    advantages = rollout.advantages
    rows = [{"step": step, "prompt": prompt, "completion": completion,
             **{name: float(rollout.rewards[i, k]) for k, name in enumerate(names)},
             "advantage": math.nan if advantages is None else float(advantages[i])}
            for i, (prompt, completion) in enumerate(zip(rollout.prompts, rollout.completions))]
    for column, values in rollout.logged_columns.items():  # what reward functions gave TRL's `log_extra`
        for row, value in zip(rows, values):
            row[column] = value
    images = rollout.columns.get("images", rollout.columns.get("image"))
    if images is not None:  # image prompts: a thumbnail of each row's first image (report.html shows it)
        from posttrain.data.vision import thumbnail_uri

        for row, image in zip(rows, images):
            image = image[0] if isinstance(image, (list, tuple)) and image else image
            row["image"] = thumbnail_uri(image) if image is not None and image != [] else None
    if rollout.tool_calls is not None:  # the whole interaction is in "completion" (messages, tool turns included)
        for i, row in enumerate(rows):
            row["tool_calls"], row["tool_failures"] = int(rollout.tool_calls[i]), int(rollout.tool_failures[i])
            row["turns"] = int(rollout.turns[i])
    return rows


def nanstd(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the last dim, ignoring NaN; NaN where fewer than 2 values."""
    _, std, count = nan_mean_std(values, dim=-1)
    return std.masked_fill(count < 2, math.nan)


def completions_sample(rows: list[dict[str, Any]], limit: int | None, unique_prompts: bool) -> list[dict[str, Any]]:
    """The rows printed at a logging step: the first completion of each distinct prompt when `unique_prompts`
    (TRL's log_unique_prompts), at most `limit` of them (TRL's num_completions_to_print; None = all)."""
    if unique_prompts:
        seen, kept = set(), []
        for row in rows:
            key = str(row["prompt"])
            if key not in seen:
                seen.add(key)
                kept.append(row)
        rows = kept
    return rows if limit is None else rows[:limit]


def print_completions(rows: list[dict[str, Any]], step: int) -> None:
    """Print a completions sample as a table (rich when installed, else plain lines)."""
    if not rows:
        return
    columns = [k for k in rows[0] if k != "step"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"completions at step {step}:")
        for row in rows:
            print(" | ".join(f"{k}={row[k]!s:.200}" for k in columns))
        return
    table = Table(title=f"completions at step {step}", show_lines=True)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in columns])
    Console().print(table)
