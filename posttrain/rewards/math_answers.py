"""Grading a completion's final answer against a gold answer, and the math rewards built on it.

    grade(text, gold)            1.0 / 0.0, or None when the gold answer cannot be read
    reasoning_accuracy_reward    grade of what follows the reasoning (`</think>`); 0 when reasoning never ends
    get_cosine_scaled_reward     correctness scaled by length on a cosine schedule (Yeo et al., 2025, App. C.1)

Two paths, chosen by the gold answer:

- **Plain gold** (a number, a numeric string such as "1,234", or GSM8K text ending in a "#### N" line): a
  completion with a "#### N" line, or with no LaTeX at all (no backslash, no $), is graded on its final number
  (`builtin.parse_final_number`, tolerance 1e-6 relative). A completion with LaTeX is graded by math-verify, so
  `\\boxed{\\frac{1}{3}}` is wrong against 3 (the last plain number, 3, would say right) and `\\boxed{\\frac{6}{2}}`
  is right.
- **Any other gold** (LaTeX, an expression, a solution text): math-verify, as TRL's accuracy_reward does — the gold
  parsed with math-verify's default extraction (retried as `$gold$` when bare LaTeX such as `\\sqrt{2}` gives
  nothing: TRL then skips the example with None; we grade it; plain words such as "unknown", which math-verify would
  read as a product of symbols, give None), the completion parsed with LaTeX extraction only
  (boxed answers first, anchors required, first match, units normalised), then `verify`. So `\\boxed{3}` is wrong
  against `\\frac{1}{3}`, `\\boxed{2}` wrong against `\\sqrt{2}`, `\\boxed{1+x^2}` right against `x^2+1`.

math-verify times parsing out with SIGALRM, which works in the main thread only; elsewhere (the reward runner's
worker thread) timeouts are off, as in TRL.

Not here: the plain-number reading itself and the other built-in rewards (`rewards/builtin.py`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

from posttrain.errors import UserError
from posttrain.rewards.protocol import completion_text

_PLAIN_NUMBER = re.compile(r"^\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?\s*$")
_WORDS = re.compile(r"^\s*[A-Za-z]{2,}(?:\s+[A-Za-z]+)*[\s.!?]*$")  # "unknown", "no answer": no math in it
_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(-?[\d,]*\.?\d+)[ \t]*$", re.MULTILINE)


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    for name in ("math_verify.parser", "math_verify.grader"):  # "timeout is disabled" warnings, once per call
        logging.getLogger(name).setLevel(logging.ERROR)
    return None, None


def _math_verify():
    try:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig
    except ImportError as error:  # a dependency of posttrain; missing only in a broken install
        raise UserError("Grading LaTeX answers needs math-verify: pip install 'math-verify>=0.7'.") from error
    return math_verify, NormalizationConfig


def parse_gold(gold: str) -> list:
    """math-verify's reading of a gold answer (empty when unreadable); bare LaTeX is retried inside $…$."""
    mv, _ = _math_verify()
    timeout, _ = _timeouts()
    parsed = mv.parse(gold, parsing_timeout=timeout)
    if not parsed and "$" not in gold and "\\boxed" not in gold:
        parsed = mv.parse(f"${gold}$", parsing_timeout=timeout)
    return parsed


def parse_answer(text: str) -> list:
    """math-verify's reading of a completion's answer: LaTeX only, `\\boxed{}` first, anchors required."""
    mv, normalization = _math_verify()
    timeout, _ = _timeouts()
    config = mv.LatexExtractionConfig(normalization_config=normalization(units=True), boxed_match_priority=0,
                                      try_extract_without_anchor=False)
    return mv.parse(text, extraction_config=[config], extraction_mode="first_match", parsing_timeout=timeout)


def _verify(gold: list, answer: list) -> float:
    mv, _ = _math_verify()
    return float(mv.verify(gold, answer, timeout_seconds=_timeouts()[1]))


def number_value(text: str) -> float:
    """A number written with or without thousands commas ("1,234.5") as a float."""
    return float(text.replace(",", ""))


def plain_gold(gold: Any) -> float | None:
    """The gold answer as a float when it is plain (see the module docstring), else None."""
    if isinstance(gold, bool) or gold is None:
        return None
    if isinstance(gold, (int, float)):
        return None if math.isnan(gold) else float(gold)
    text = str(gold)
    if _PLAIN_NUMBER.match(text) and any(c.isdigit() for c in text):
        return number_value(text)
    found = _HASH_LINE.findall(text)
    return number_value(found[-1]) if found else None


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def grade(text: str, gold: Any, trace: list | None = None) -> float | None:
    """1.0 when `text`'s final answer equals `gold`, 0.0 when not, None when `gold` is missing or unreadable.
    `trace`, when given, gets (gold as read, answer as read) for the completions table."""
    from posttrain.rewards.builtin import parse_final_number

    if gold is None:
        return None
    number = plain_gold(gold)
    if number is not None:
        if not _HASH_LINE.search(text) and ("\\" in text or "$" in text):
            answer = parse_answer(text)
            if answer:
                if trace is not None:
                    trace.append((_number_text(number), str(answer)))
                return _verify(parse_gold(_number_text(number)), answer)
        predicted = parse_final_number(text)
        if trace is not None:
            trace.append((_number_text(number), "[no number]" if predicted is None else _number_text(predicted)))
        return float(predicted is not None and abs(predicted - number) <= 1e-6 * max(1.0, abs(number)))
    gold_parsed = [] if _WORDS.match(str(gold)) else parse_gold(str(gold))
    if not gold_parsed:
        if trace is not None:
            trace.append(("[unparseable]", "[skipped]"))
        return None
    answer = parse_answer(text)
    if trace is not None:
        trace.append((str(gold_parsed), str(answer) if answer else "[unparseable]"))
    return _verify(gold_parsed, answer)


def gold_column(answer: list | None, solution: list | None, n: int) -> list:
    """The gold answer per row: `answer` where given, else `solution`, else None."""
    golds = []
    for i in range(n):
        gold = answer[i] if answer is not None else None
        if gold is None and solution is not None:
            gold = solution[i]
        golds.append(gold)
    return golds


def log_trace(log_extra: Callable | None, golds: list, trace: list) -> None:
    if log_extra is not None:
        log_extra("solution", [None if g is None else str(g) for g in golds])
        log_extra("gold_parsed", [t[0] for t in trace])
        log_extra("answer_parsed", [t[1] for t in trace])


def reasoning_accuracy_reward(completions: list, solution: list | None = None,
                              reasoning_delimiters: list[str] | None = None, log_extra: Callable | None = None,
                              answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """`accuracy_reward` on the text after the reasoning: the part after the first of `reasoning_delimiters`
    (default ["</think>"]) found in the completion, split at its last occurrence. A completion whose reasoning never
    ends gets 0.0 (not None: unfinished reasoning is penalised); a missing/unreadable gold gets None."""
    delimiters = reasoning_delimiters or ["</think>"]
    golds = gold_column(answer, solution, len(completions))
    out: list[float | None] = []
    trace: list = []
    for completion, gold in zip(completions, golds):
        text = completion_text(completion)
        delimiter = next((d for d in delimiters if d in text), None)
        if delimiter is None:
            out.append(0.0)
            trace.append(("[incomplete reasoning]", "[incomplete reasoning]"))
            continue
        before = len(trace)
        out.append(grade(text.split(delimiter)[-1], gold, trace))
        if len(trace) == before:
            trace.append(("[missing]", "[skipped]"))
    log_trace(log_extra, golds, trace)
    return out


class CosineScaledReward:
    """Correctness scaled by completion length |y| (tokens) on a cosine schedule (Yeo et al., 2025, "Demystifying
    Long Chain-of-Thought Reasoning in LLMs", App. C.1):

        R(y) = v_min + ½ (v_max − v_min) (1 + cos(π · min(|y| / L_max, 1)))

    right answers: (v_min, v_max) = (min_value_correct, max_value_correct), so shorter is better; wrong answers:
    (v_min, v_max) = (max_value_wrong, min_value_wrong), so a short wrong answer is penalised most. |y| is clamped
    at L_max (the cosine would climb again past it). None where the gold answer is missing or unreadable.
    """

    __name__ = "cosine_scaled_reward"

    def __init__(self, max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0):
        if max_len <= 0:
            raise UserError(f"max_len must be > 0 (the completion length the schedule spans), got {max_len}.")
        self.max_len = max_len
        self.min_value_wrong, self.max_value_wrong = min_value_wrong, max_value_wrong
        self.min_value_correct, self.max_value_correct = min_value_correct, max_value_correct

    def __call__(self, completions: list, solution: list | None = None, completion_ids: list | None = None,
                 answer: list | None = None, **kwargs: Any) -> list[float | None]:
        from posttrain.rewards.builtin import accuracy_reward

        if completion_ids is None:
            raise UserError("cosine_scaled_reward needs completion_ids (the trainers always pass them).")
        out: list[float | None] = []
        for right, ids in zip(accuracy_reward(completions, answer=answer, solution=solution), completion_ids):
            if right is None:
                out.append(None)
                continue
            low, high = ((self.min_value_correct, self.max_value_correct) if right
                         else (self.max_value_wrong, self.min_value_wrong))
            progress = min(len(ids) / self.max_len, 1.0)
            out.append(low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi)))
        return out

    def __repr__(self) -> str:
        return (f"CosineScaledReward(max_len={self.max_len}, min_value_wrong={self.min_value_wrong}, "
                f"max_value_wrong={self.max_value_wrong}, min_value_correct={self.min_value_correct}, "
                f"max_value_correct={self.max_value_correct})")


def get_cosine_scaled_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                             min_value_correct: float = 0.5, max_value_correct: float = 1.0) -> CosineScaledReward:
    """A length-scaled correctness reward (see `CosineScaledReward`)."""
    return CosineScaledReward(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
