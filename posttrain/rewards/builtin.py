"""Built-in reward functions, addressable by name (`--reward_funcs accuracy_reward format_reward`).

All follow `rewards/protocol.py` (keyword arguments, `**kwargs`, one value or None per completion) and accept
standard (string) and conversational (message list) completions. All are module-level functions or instances
of module-level classes, so they pickle (for worker processes).

    accuracy_reward            1 / 0 for the right final answer: plain numbers compared, LaTeX answers verified
                               with math-verify (`rewards/math_answers.py`); None without a readable gold answer
    reasoning_accuracy_reward  accuracy_reward of the text after `</think>`; 0 when the reasoning never ends
    format_reward              1 / 0 for a worked answer: computations `a op b = c`, then one final `#### c` line
    think_format_reward        1 / 0 for `<think>…</think>` followed by an answer
    length_reward              −(completion tokens) / 1000
    repetition_penalty_reward  −(fraction of repeated token 3-grams), in [−1, 0]
    soft_overlong_punishment   DAPO's soft overlong punishment with L_max = 256 (GRPOConfig's default
                               max_completion_length) and L_cache = 64; for other lengths build one with
                               `get_soft_overlong_punishment(L_max, L_cache)`

Not here: calling rewards and reward models (`rewards/runner.py`), answer extraction for the arithmetic data
(`data/arith.py`, reused here).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from posttrain.data.arith import extract_answer
from posttrain.errors import UserError
from posttrain.rewards.math_answers import number_value, reasoning_accuracy_reward
from posttrain.rewards.protocol import completion_text

# A number: thousands-grouped ("1,234.5") or plain ("-12", "3.75"); grouped first so "1,234" is one number.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"^[ \t]*####[ \t]*-?\d[\d,]*(?:\.\d+)?[ \t]*$", re.MULTILINE)
# A computation "a op b [op …] = c" on one line (the working of a worked answer); group 1 is c, read ahead so that
# a chain "a + b = c + d = e" yields c, then e.
_EQUATION_RESULT = re.compile(r"\d\)?[ \t]*[-+*/x×÷][ \t]*\(?-?\$?\d[^=\n]*=[ \t]*\$?(?=(-?\d[\d,]*(?:\.\d+)?))")


def parse_final_number(text: str | None) -> float | None:
    """The final answer in `text` as a float: `#### N`, else `\\boxed{N}` (via `data.arith.extract_answer`), else
    the last number anywhere in the text; None when there is no number at all."""
    if not text:
        return None
    answer = extract_answer(text)
    if answer is None:
        found = _NUMBER.findall(text)
        answer = found[-1] if found else None
    try:
        return None if answer is None else number_value(answer)
    except ValueError:
        return None


def accuracy_reward(completions: list, answer: list | None = None, solution: list | None = None,
                    log_extra: Callable | None = None, **kwargs: Any) -> list[float | None]:
    """Rule-based correctness, as in DeepSeek-R1 (DeepSeek-AI, 2025, §2.2.2 "accuracy rewards"): 1.0 when the
    completion's final answer equals the gold answer, 0.0 when not, None when there is no readable gold answer.

    The gold answer is the `answer` column, else the `solution` column. Graded by `math_answers.grade`: plain
    numeric gold answers (our arithmetic data, GSM8K's "… #### 72") compare the final number of completions
    without LaTeX (`#### N`, `\\boxed{N}` or the last number, tolerance 1e-6 · max(1, |y|)); LaTeX completions and
    every other gold answer (fractions, roots, expressions) go through math-verify as in TRL, so `\\boxed{3}` is
    wrong against `\\frac{1}{3}` and `1+x^2` right against `x^2+1`. `log_extra` (given by the trainers) gets the
    solution and both parsed answers for the completions table.
    """
    from posttrain.rewards import math_answers

    golds = math_answers.gold_column(answer, solution, len(completions))
    trace: list = []
    out: list[float | None] = []
    for completion, gold in zip(completions, golds):
        before = len(trace)
        out.append(math_answers.grade(completion_text(completion), gold, trace))
        if len(trace) == before:
            trace.append(("[missing]", "[skipped]"))
    math_answers.log_trace(log_extra, golds, trace)
    return out


def _has_worked_answer(text: str) -> bool:
    text = text.rstrip()
    lines = text.splitlines()
    if not lines or len(_ANSWER_LINE.findall(text)) != 1 or not _ANSWER_LINE.fullmatch(lines[-1]):
        return False
    results = _EQUATION_RESULT.findall("\n".join(lines[:-1]))
    answer = _NUMBER.search(lines[-1]).group()
    return bool(results) and number_value(results[-1]) == number_value(answer)


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """1.0 for a worked answer in the built-in arithmetic format, else 0.0: the last non-empty line is exactly
    `#### N` (N a number, surrounding spaces allowed) and the only such line, and the lines before it show at least
    one computation `a op b = c` (op one of + - * / x × ÷) whose last result c is N.

    The GSM8K answer format (Cobbe et al., 2021) that the built-in data sets teach ("23 + 8 = 29\n#### 29") and
    their prompts ask for ("Solve it step by step, then give the final answer on a last line that starts with
    ####."). Each condition closes a way GRPO from SmolLM2-135M-Instruct gamed a looser rule
    (benchmarks/LEARNING-smollm2.md): with "some line is #### N" it printed "#### 23" twenty-five times (accuracy
    0.070 → 0.013); with "the last line is the only #### N" it answered every question with a bare "#### 12"
    (0.068 → 0.023). "12 #### 12" on one line does not count either.
    """
    return [1.0 if _has_worked_answer(completion_text(c)) else 0.0 for c in completions]


def _has_think_format(text: str) -> bool:
    text = text.strip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return False
    return bool(text.split("</think>", 1)[1].strip())


def think_format_reward(completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion is `<think>reasoning</think>` followed by a non-empty answer, else 0.0.

    The format reward of DeepSeek-R1 (DeepSeek-AI, 2025, §2.2.2). Leading/trailing whitespace is ignored; the
    reasoning may be empty; a second `<think>` or `</think>` anywhere fails. If the chat template already opens
    `<think>` in the generation prompt, the completion starts inside the block and this reward gives 0.
    """
    return [1.0 if _has_think_format(completion_text(c)) else 0.0 for c in completions]


def length_reward(completion_ids: list[list[int]] | None = None, **kwargs: Any) -> list[float]:
    """r_i = −|y_i| / 1000, with |y_i| the number of generated tokens: a mild, unbounded push towards brevity
    (−0.256 for a 256-token completion). Weight it against the task reward with `reward_weights`."""
    if completion_ids is None:
        raise UserError("length_reward needs completion_ids (the trainers always pass them).")
    return [-len(ids) / 1000.0 for ids in completion_ids]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and (not value or isinstance(value[0], int)) or hasattr(value, "tolist")


class RepetitionPenalty:
    """r_i = p · (1 − |unique n-grams of y_i| / |n-grams of y_i|), in [p, 0]; 0 when y_i is shorter than n.

    The n-gram repetition penalty of Yeo et al., 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs"
    (App. C.2), with p = `max_penalty` (≤ 0). The n-grams are over the completion's token ids (`completion_ids`,
    which the trainers pass; as in the paper and TRL 1.16). Called with texts only (`completions`, or texts as the
    first argument), it counts lower-cased whitespace-split words instead.
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0):
        if ngram_size < 1:
            raise UserError(f"ngram_size must be ≥ 1, got {ngram_size}.")
        if max_penalty > 0:
            raise UserError(f"max_penalty must be ≤ 0 (it is a penalty), got {max_penalty}.")
        self.ngram_size, self.max_penalty = ngram_size, max_penalty
        self.__name__ = "repetition_penalty_reward"

    def score_units(self, units: list) -> float:
        n = self.ngram_size
        ngrams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
        if not ngrams:
            return 0.0
        return self.max_penalty * (1.0 - len(set(ngrams)) / len(ngrams)) + 0.0  # + 0.0: no -0.0 in logs

    def score(self, text: str) -> float:
        return self.score_units(text.lower().split())

    def __call__(self, completion_ids: list | None = None, completions: list | None = None,
                 **kwargs: Any) -> list[float]:
        if completion_ids is not None and completion_ids and not _is_token_ids(completion_ids[0]):
            completion_ids, completions = None, completion_ids  # texts given first: repetition_penalty(texts)
        if completion_ids is not None:
            return [self.score_units(list(ids.tolist() if hasattr(ids, "tolist") else ids)) for ids in completion_ids]
        if completions is None:
            raise UserError("repetition_penalty_reward needs completion_ids or completions.")
        return [self.score(completion_text(c)) for c in completions]

    def __repr__(self) -> str:
        return f"RepetitionPenalty(ngram_size={self.ngram_size}, max_penalty={self.max_penalty})"


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> RepetitionPenalty:
    """A repetition penalty over token (or word) `ngram_size`-grams, scaled to [max_penalty, 0]
    (see `RepetitionPenalty`)."""
    return RepetitionPenalty(ngram_size, max_penalty)


_DEFAULT_REPETITION = RepetitionPenalty(3, -1.0)


def repetition_penalty_reward(completion_ids: list | None = None, completions: list | None = None,
                              **kwargs: Any) -> list[float]:
    """−(fraction of repeated token 3-grams), in [−1, 0]: `RepetitionPenalty(ngram_size=3, max_penalty=-1.0)`.

    Token ids [1, 2, 3, 1, 2, 3] (or words "a b c a b c") have 3-grams (1 2 3)(2 3 1)(3 1 2)(1 2 3): 3 unique of
    4, so r = −(1 − 3/4) = −0.25.
    """
    return _DEFAULT_REPETITION(completion_ids, completions)


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (Yu et al., 2025, "DAPO", Eq. 13), from the completion's token count |y|:

        R(y) = 0                                  |y| ≤ L_max − L_cache
               ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
               −1                                 |y| > L_max

    L_max = `max_completion_len` (normally the trainer's max_completion_length, so a truncated completion gets
    −1), L_cache = `soft_punish_cache`. With L_cache = 0 it is a step: 0 up to L_max, −1 beyond.
    """

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if max_completion_len <= 0:
            raise UserError(f"max_completion_len must be > 0, got {max_completion_len}.")
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise UserError(f"soft_punish_cache must be in [0, max_completion_len={max_completion_len}], "
                            f"got {soft_punish_cache}.")
        self.max_completion_len, self.soft_punish_cache = max_completion_len, soft_punish_cache
        self.__name__ = "soft_overlong_punishment"

    def score(self, length: int) -> float:
        free = self.max_completion_len - self.soft_punish_cache
        if length <= free:
            return 0.0
        if length <= self.max_completion_len:
            return (free - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, completion_ids: list[list[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is None:
            raise UserError("soft_overlong_punishment needs completion_ids (the trainers always pass them).")
        return [self.score(len(ids)) for ids in completion_ids]

    def __repr__(self) -> str:
        return (f"SoftOverlongPunishment(max_completion_len={self.max_completion_len}, "
                f"soft_punish_cache={self.soft_punish_cache})")


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """DAPO Eq. 13 for the given L_max and L_cache (see `SoftOverlongPunishment`); the DAPO paper uses
    L_max = 20480, L_cache = 4096 with 16384 tokens always free."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


BUILTIN_REWARDS: dict[str, Callable[..., list]] = {
    "accuracy_reward": accuracy_reward,
    "format_reward": format_reward,
    "think_format_reward": think_format_reward,
    "length_reward": length_reward,
    "reasoning_accuracy_reward": reasoning_accuracy_reward,
    "repetition_penalty_reward": repetition_penalty_reward,
    # Defaults match GRPOConfig.max_completion_length = 256; other lengths need get_soft_overlong_punishment.
    "soft_overlong_punishment": SoftOverlongPunishment(256, 64),
}
