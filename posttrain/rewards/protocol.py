"""The reward-function protocol: how every online trainer (GRPO, RLOO, PPO, online DPO) calls a reward.

A reward function is any callable, `def` or `async def`, called once per batch of N completions with keyword
arguments only:

    prompts          list of N prompts: strings (standard) or message lists (conversational). Each prompt is
                     repeated once per completion of its group, so index i of every list refers to the same row.
    completions      list of N completions: strings, or for conversational data one assistant message in a list,
                     `[{"role": "assistant", "content": text}]`. `completion_text` reads either form.
    completion_ids   list of N token-id lists (the generated tokens, without padding).
    <column>         every extra dataset column, as a list of N values aligned with the completions
                     (e.g. `answer`, `solution`, `task`).
    trainer_state    the `transformers.TrainerState` of the running trainer (step, epoch, …), or None outside one.
    **kwargs         must be accepted: trainers may pass more keywords in later versions, and a function
                     reads only the columns it needs.

It returns a list of N values, each a finite number (int, float, bool, numpy scalar) or None. None means "not
applicable to this completion" (e.g. a maths reward on a coding row of a mixed data set): it becomes NaN and is
left out of sums and statistics. NaN is treated the same way (a reward model or a parser can fail on one odd
completion without stopping the run), but it is not silent: the runner warns once per function, counts NaNs
per batch (`rewards/<name>/nan_frac` in the trainer's logs) and refuses a batch in which a function returned NaN
for *every* completion — that is a broken function, not an odd completion. Infinity is refused. Example:

    def exact_answer(completions, answer, **kwargs):
        return [1.0 if completion_text(c).strip() == a else 0.0 for c, a in zip(completions, answer)]

Lives here: the protocol's documentation, a `typing.Protocol` for annotations, reading a completion's text,
naming a reward function, and checking what one returned. Not here: calling functions and models
(`rewards/runner.py`), the built-in rewards (`rewards/builtin.py`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Protocol

from posttrain.errors import UserError


class RewardFunction(Protocol):
    """Annotation type for reward functions; see the module docstring for the full contract."""

    def __call__(self, *, prompts: list, completions: list, completion_ids: list[list[int]] | None,
                 trainer_state: Any = None, **kwargs: Any) -> list[float | None]: ...


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the content of the last message of a message list.

    Content given as parts (`[{"type": "text", "text": …}, …]`) is joined; non-text parts are skipped.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return "" if content is None else str(content)
    return "" if completion is None or completion == [] else str(completion)


def reward_name(func: Any) -> str:
    """The name used in logs: a function's `__name__`, a partial's function name, else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) and name else type(func).__name__


def check_rewards(name: str, values: Any, expected: int) -> list[float]:
    """`values` as N floats with None and NaN → NaN; ValueError naming the function for anything off-protocol
    (the runner decides what to do about NaN: see `RewardRunner`)."""
    if values is None:
        raise UserError(f"reward function {name!r} returned None instead of a list; return a list with one value "
                        f"per completion ([None] * {expected} to mark the whole batch as not applicable).")
    if not isinstance(values, (list, tuple)):
        raise UserError(f"reward function {name!r} returned a {type(values).__name__}; it must return a list with "
                        "one float (or None) per completion (call .tolist() on arrays and tensors).")
    if len(values) != expected:
        raise UserError(f"reward function {name!r} returned {len(values)} values for {expected} completions; it "
                        "must return exactly one value (a float, or None for 'not applicable') per completion.")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if not isinstance(value, numbers.Real):
            raise UserError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) at index {i}; "
                            "each value must be a number, or None for 'not applicable'.")
        value = float(value)
        if math.isinf(value):
            raise UserError(f"reward function {name!r} returned {value} at index {i}; rewards must be finite.")
        out.append(value)
    return out
