"""Built-in arithmetic word problems, generated in memory under fixed seeds: the offline data sets `posttrain/arith-*`.

Each problem is a one-step word problem (add, subtract with a non-negative result, multiply small numbers) with
operands 1–20 (factors 2–10), small enough that a few-million-parameter model trained from scratch on a CPU for a
few minutes learns the format and many of the answers. A problem has:

    question  "Mia has 7 apples and buys 5 more. How many apples does Mia have now?"
    answer    "12"
    solution  "7 + 5 = 12\\n#### 12"          (GSM8K style: working, then a final `#### N` line)
    wrong     "7 + 5 = 13\\n#### 13"          (same format, a plausible wrong number; for preference data)

`extract_answer` reads the final answer from a completion: the last `#### N` line, else the last `\\boxed{N}`.
Reward functions compare it to the `answer` column.

Standard rows use "Question: …\\nAnswer:" as the prompt and " <solution>" as the completion; conversational rows
use a user message (the question) and an assistant message (the solution). Every data set has a train split of
2,000 rows and the same test split of 1,000 rows, all drawn from one pool of distinct questions:

    pool[0:2000]     train of arith-lm and arith-sft (the supervised stage)
    pool[2000:3000]  test of every data set (its first 200 rows were the whole test split before 1,000)
    pool[3000:5000]  train of arith-pref, arith-pref-implicit and arith-kto (preference data)
    pool[5000:7000]  train of arith-prompts (prompts for online RL)

so no test question is a training question anywhere, and each later stage of a pipeline trains on questions the
earlier stages never saw, as real preference and RL data differ from the SFT set (a model that has memorised its
SFT questions gets no learning signal from RL on those same prompts). Arithmetic facts themselves (7 + 5) do recur
across slices, by design: the table is small and learning it is part of the task.

The registry below also serves `posttrain/wordmath-*` and `posttrain/chat-prompts` (`data/wordmath.py`).

Not here: loading local files or Hub ids (`data/loading.py`), reward functions (`rewards/`).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from posttrain.errors import UserError

TRAIN_ROWS, TEST_ROWS = 2000, 1000
# where each data set's train split starts in the pool (the test split is pool[TRAIN_ROWS:TRAIN_ROWS + TEST_ROWS])
_TRAIN_START = {"posttrain/arith-lm": 0, "posttrain/arith-sft": 0, "posttrain/arith-pref": 3000,
                "posttrain/arith-pref-implicit": 3000, "posttrain/arith-kto": 3000, "posttrain/arith-prompts": 5000}
_POOL_SIZE = 7000
_SEED = 1234
_FORMATS = ("standard", "conversational")

_NAMES = ("Mia", "Liam", "Ava", "Noah", "Emma", "Omar", "Sofia", "Lucas", "Zoe", "Ethan", "Priya", "Mateo",
          "Hana", "Leo", "Grace", "Yusuf", "Chloe", "Diego", "Nora", "Kai")
# (singular, plural) so "1 apple" and "7 apples" both read naturally.
_ITEMS = (("apple", "apples"), ("marble", "marbles"), ("book", "books"), ("pencil", "pencils"),
          ("cookie", "cookies"), ("sticker", "stickers"), ("shell", "shells"), ("coin", "coins"),
          ("flower", "flowers"), ("card", "cards"), ("toy car", "toy cars"), ("orange", "oranges"),
          ("balloon", "balloons"), ("stamp", "stamps"), ("cupcake", "cupcakes"), ("ribbon", "ribbons"))
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("tray", "trays"))

# Templates per operation. Fields: {name} {friend} {a} {b} {ia} {ib} (item word agreeing with a, b),
# {items} (plural), {ca} (container word agreeing with a).
_TEMPLATES = {
    "+": (
        "{name} has {a} {ia} and buys {b} more. How many {items} does {name} have now?",
        "{name} picked {a} {ia} in the morning and {b} {ib} in the afternoon. "
        "How many {items} did {name} pick in total?",
        "{name} has {a} {ia}. {friend} gives {name} {b} more. How many {items} does {name} have?",
    ),
    "-": (
        "{name} had {a} {ia} and gave {b} to {friend}. How many {items} does {name} have left?",
        "There are {a} {ia} on the table. {name} takes {b} of them. How many {items} are left on the table?",
        "{name} had {a} {ia} and lost {b}. How many {items} does {name} have now?",
    ),
    "*": (
        "{name} has {a} {ca} with {b} {ib} in each. How many {items} does {name} have?",
        "{name} buys {a} packs of {items}. Each pack holds {b} {ib}. How many {items} does {name} buy?",
    ),
}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str
    wrong: str


def _operands(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 10), rng.randint(2, 10)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def _compute(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _wrong_solution(op: str, a: int, b: int, rng: random.Random) -> str:
    """A plausible mistake: the right equation with a result off by a little, or the wrong operation."""
    right = _compute(op, a, b)
    if rng.random() < 0.3:
        other = "-" if op == "+" and a >= b else "+"
        if _compute(other, a, b) != right:
            value = _compute(other, a, b)
            return f"{a} {other} {b} = {value}\n#### {value}"
    offsets = [d for d in (-2, -1, 1, 2) if right + d >= 0]
    value = right + rng.choice(offsets)
    return f"{a} {op} {b} = {value}\n#### {value}"


def _make_problem(rng: random.Random) -> Problem:
    op = rng.choice("++--*")  # add and subtract twice as often as multiply
    a, b = _operands(op, rng)
    name, friend = rng.sample(_NAMES, 2)
    (one, many), container = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    question = rng.choice(_TEMPLATES[op]).format(
        name=name, friend=friend, a=a, b=b, items=many, ia=one if a == 1 else many, ib=one if b == 1 else many,
        ca=container[0] if a == 1 else container[1])
    value = _compute(op, a, b)
    solution = f"{a} {op} {b} = {value}\n#### {value}"
    return Problem(question, str(value), solution, _wrong_solution(op, a, b, rng))


def generate_problems(n: int = _POOL_SIZE, seed: int = _SEED, make: Callable = _make_problem) -> list:
    """`n` problems with distinct questions, always the same ones for the same seed (`make(rng)` draws one; the
    word problems of `data/wordmath.py` use the same loop with their own maker)."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < n:
        problem = make(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


_ANSWER_HASHES = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_ANSWER_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]*\.?\d+)\s*\}")


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: the last `#### N`, else the last `\\boxed{N}`; None when neither is there.

    Thousands separators are dropped ("1,234" → "1234") so the result compares equal to the `answer` column.
    """
    for pattern in (_ANSWER_HASHES, _ANSWER_BOXED):
        found = pattern.findall(text or "")
        if found:
            return found[-1].replace(",", "")
    return None


# ---- rows per data set ---------------------------------------------------------------------------------------

def _prompt(p: Problem, conv: bool):
    return [{"role": "user", "content": p.question}] if conv else f"Question: {p.question}\nAnswer:"


def _reply(text: str, conv: bool):
    return [{"role": "assistant", "content": text}] if conv else " " + text


def _lm_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    if conv:
        return {"messages": _prompt(p, True) + _reply(p.solution, True), "answer": p.answer}
    return {"text": _prompt(p, False) + _reply(p.solution, False), "answer": p.answer}


def _sft_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    return {"prompt": _prompt(p, conv), "completion": _reply(p.solution, conv), "answer": p.answer}


def _pref_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    return {"prompt": _prompt(p, conv), "chosen": _reply(p.solution, conv), "rejected": _reply(p.wrong, conv),
            "answer": p.answer}


def _pref_implicit_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    prompt = _prompt(p, conv)
    return {"chosen": prompt + _reply(p.solution, conv), "rejected": prompt + _reply(p.wrong, conv),
            "answer": p.answer}


def _kto_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    label = rng.random() < 0.5
    return {"prompt": _prompt(p, conv), "completion": _reply(p.solution if label else p.wrong, conv),
            "label": label, "answer": p.answer}


def _prompts_row(p: Problem, conv: bool, rng: random.Random) -> dict:
    return {"prompt": _prompt(p, conv), "answer": p.answer, "solution": p.solution}


_ROW_BUILDERS: dict[str, Callable[[Problem, bool, random.Random], dict]] = {
    "posttrain/arith-lm": _lm_row,
    "posttrain/arith-sft": _sft_row,
    "posttrain/arith-pref": _pref_row,
    "posttrain/arith-pref-implicit": _pref_implicit_row,
    "posttrain/arith-kto": _kto_row,
    "posttrain/arith-prompts": _prompts_row,
}

BUILTIN_DATASETS: dict[str, str] = {
    "posttrain/arith-lm": "language modelling: `text` (standard) or `messages` (conversational)",
    "posttrain/arith-sft": "prompt-completion: `prompt`, `completion`",
    "posttrain/arith-pref": "preference, explicit prompt: `prompt`, `chosen`, `rejected`",
    "posttrain/arith-pref-implicit": "preference, implicit prompt: `chosen`, `rejected`",
    "posttrain/arith-kto": "unpaired preference: `prompt`, `completion`, `label` (about half True)",
    "posttrain/arith-prompts": "prompt-only for online RL: `prompt`, `answer`, `solution`",
}


def _all_builtin() -> dict[str, str]:
    from posttrain.data import wordmath

    return {**BUILTIN_DATASETS, **wordmath.BUILTIN_DATASETS}


def is_builtin_dataset(name: str) -> bool:
    return name in _all_builtin()


def _build(name: str, conv: bool) -> datasets.DatasetDict:
    problems = _pool()
    builder = _ROW_BUILDERS[name]
    start = _TRAIN_START[name]
    # One RNG per split, seeded apart from the problem pool, so a KTO label never depends on the other split.
    splits = {"train": problems[start:start + TRAIN_ROWS], "test": problems[TRAIN_ROWS:TRAIN_ROWS + TEST_ROWS]}
    out = {}
    for offset, (split, chunk) in enumerate(splits.items()):
        rng = random.Random(_SEED + 1 + offset)
        out[split] = datasets.Dataset.from_list([builder(p, conv, rng) for p in chunk])
    return datasets.DatasetDict(out)


@functools.cache
def _pool() -> tuple[Problem, ...]:
    return tuple(generate_problems())


_SLICE = re.compile(r"^(\w+)\[(-?\d*)(%?):(-?\d*)(%?)\]$")


def _select_split(dataset_dict: datasets.DatasetDict, split: str) -> datasets.Dataset:
    """"train", "test", or a slice of one: "train[:100]", "train[100:200]", "test[:10%]"."""
    match = _SLICE.match(split.replace(" ", ""))
    base = match.group(1) if match else split
    if base not in dataset_dict:
        raise UserError(f"Unknown split {split!r}; available splits: {', '.join(dataset_dict)} "
                        "(optionally sliced, e.g. 'train[:100]').")
    dataset = dataset_dict[base]
    if not match:
        return dataset
    n = len(dataset)

    def bound(value: str, percent: str, default: int) -> int:
        if not value:
            return default
        return round(int(value) * n / 100) if percent else int(value)

    start, stop = bound(match.group(2), match.group(3), 0), bound(match.group(4), match.group(5), n)
    return dataset.select(range(*slice(start, stop).indices(n)))


def load_builtin_dataset(name: str, config: str | None = None, split: str | None = None):
    """A built-in data set: a DatasetDict with `train` and `test`, or one Dataset when `split` is given.

    `config` is "standard" (default; plain strings) or "conversational" (lists of {role, content} messages).
    """
    if name not in _all_builtin():
        raise UserError(f"Unknown built-in data set {name!r}; available: {', '.join(_all_builtin())}.")
    if name not in BUILTIN_DATASETS:  # posttrain/wordmath-* and posttrain/chat-prompts
        from posttrain.data import wordmath

        dataset_dict = wordmath.build(name, config)
        return dataset_dict if split is None else _select_split(dataset_dict, split)
    config = config or "standard"
    if config not in _FORMATS:
        raise UserError(f"Unknown config {config!r} for {name!r}; available configs: {', '.join(_FORMATS)}.")
    dataset_dict = _build(name, config == "conversational")
    return dataset_dict if split is None else _select_split(dataset_dict, split)
