"""Exception types for mistakes in what the user gave (data, options, functions), as opposed to bugs.

`UserError` messages are one line that says what was wrong and how to fix it; the CLI prints them without a
traceback (`--debug` shows it). Anything else that escapes is treated as a bug and keeps its traceback. `UserError`
is a `ValueError` (and `UserTypeError` a `TypeError`) so that code catching the built-in types keeps working.
Not here: the checks themselves (they live beside the code that reads the input).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in the user's input; the message names it and the fix."""


class UserTypeError(UserError, TypeError):
    """A keyword argument or value of the wrong kind (e.g. an option the trainer does not take)."""


class RewardFunctionError(UserError, RuntimeError):
    """A user's reward function raised; the message names the function, the original is the `__cause__`."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced NaN or inf (loss, gradients or weights) and cannot go on; the message says what to change."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `known` to a mistyped `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
