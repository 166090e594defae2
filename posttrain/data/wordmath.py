"""Built-in word problems for a real chat model, and chat prompts to check it did not get worse elsewhere.

`posttrain/wordmath-*` are short word problems with one to three arithmetic steps (add, subtract, multiply,
share equally), many phrasings, numbers up to a few hundred, and a checkable final answer: the worked solution
ends with a line `#### N`, which `accuracy_reward` and `format_reward` read. SmolLM2-135M-Instruct gets most of
them wrong ("Tom has 12 apples. He buys 7 more and then gives 5 to his sister." → "12 + 7 = 19 … 19 - 12 = 5"),
so they measure a skill post-training can add. A problem has:

    question  "Omar has 12 stamps. Omar buys 7 more. Then Omar gives 5 to Ava. How many stamps does Omar have now?"
    answer    "14"
    solution  "12 + 7 = 19\\n19 - 5 = 14\\n#### 14"
    wrong     "12 + 7 = 19\\n19 - 5 = 15\\n#### 15"   (one step's result off a little: a preference `rejected`)

Rows are conversational (the model is a chat model): the user message is the question plus one sentence asking
for the `#### N` line. One pool of distinct questions, sliced so that no test question is trained on anywhere and
each stage of a pipeline sees questions the earlier stages did not:

    pool[0:3000]      train of wordmath-sft (worked solutions)
    pool[3000:4000]   test of every wordmath data set (1,000 held-out questions)
    pool[4000:6000]   train of wordmath-pref (and wordmath-kto)
    pool[6000:8000]   train of wordmath-prompts (prompts for online RL, and for sampling on-policy pairs)

`posttrain/chat-prompts` holds 300 everyday, non-arithmetic chat requests (train 100 / test 200), built from
templates: the drift check (`evaluation.drift_from_start`) scores how far a trained model moved from its start
on them.

Not here: the 4M model's one-step task (`data/arith.py`), reward functions (`rewards/`).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import datasets

from posttrain.errors import UserError

INSTRUCTION = "Solve it step by step, then give the final answer on a last line that starts with ####."
SFT_ROWS, TEST_ROWS, PREF_ROWS, PROMPT_ROWS = 3000, 1000, 2000, 2000
_SLICES = {"sft": (0, 3000), "test": (3000, 4000), "pref": (4000, 6000), "prompts": (6000, 8000)}
_POOL_SIZE = 8000
_SEED = 2026

_NAMES = ("Mia", "Liam", "Ava", "Noah", "Emma", "Omar", "Sofia", "Lucas", "Zoe", "Ethan", "Priya", "Mateo", "Hana",
          "Leo", "Grace", "Yusuf", "Chloe", "Diego", "Nora", "Kai", "Amara", "Felix", "Ines", "Ravi")
_ITEMS = ("apples", "marbles", "books", "pencils", "cookies", "stickers", "shells", "coins", "flowers", "cards",
          "oranges", "balloons", "stamps", "cupcakes", "ribbons", "beads", "eggs", "tickets", "candles", "buttons")
_CONTAINERS = ("boxes", "bags", "jars", "baskets", "trays", "crates")

_START = ("{name} has {a} {items}.", "{name} had {a} {items}.", "There are {a} {items} in {name}'s room.",
          "{name} starts the day with {a} {items}.", "{name} collected {a} {items}.")
_START_MUL = ("{name} has {a} {containers} with {b} {items} in each.",
              "{name} buys {a} {containers} of {items}, and each holds {b}.",
              "{name} has {a} {containers}, and each one holds {b} {items}.")
_STEPS = {
    "+": ("{name} buys {b} more.", "{friend} gives {name} {b} more.", "Then {name} finds {b} more.",
          "The next day {name} gets {b} more.", "{name} wins {b} more at a fair."),
    "-": ("{name} gives {b} to {friend}.", "{name} loses {b} of them.", "{name} uses {b} of them.",
          "{friend} takes {b} of them.", "Then {name} sells {b}."),
    "*": ("Then the number of {items} becomes {b} times as large.", "{name} ends up with {b} times as many.",
          "A week later {name} has {b} times as many {items}."),
    "packs": ("{name} buys {b} packs with {c} {items} in each.", "{friend} gives {name} {b} bags of {c} {items}."),
}
_QUESTIONS = ("How many {items} does {name} have now?", "How many {items} does {name} have in the end?",
              "How many {items} are there now?")
_SHARE = ("{name} shares them equally among {b} friends. How many {items} does each friend get?",
          "{name} puts them into {b} equal groups. How many {items} are in each group?")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str
    wrong: str
    steps: int


def _step(op: str, value: int, rng: random.Random) -> tuple[int, int, int] | None:
    """(b, c, new value) for one step on `value`, or None when the operation does not fit the numbers."""
    if op == "+":
        b = rng.randint(1, 40)
        return b, 0, value + b
    if op == "-":
        if value < 2:
            return None
        b = rng.randint(1, min(value - 1, 40))
        return b, 0, value - b
    if op == "*":
        b = rng.randint(2, 4)
        return (b, 0, value * b) if value * b <= 600 else None
    b, c = rng.randint(2, 6), rng.randint(2, 12)  # "packs": add b groups of c
    return b, c, value + b * c


def _divisors(value: int) -> list[int]:
    return [d for d in range(2, 10) if value % d == 0 and value // d > 1]


def _make_problem(rng: random.Random) -> Problem:
    name, friend = rng.sample(_NAMES, 2)
    fields = {"name": name, "friend": friend, "items": rng.choice(_ITEMS), "containers": rng.choice(_CONTAINERS)}
    steps = rng.choice((1, 1, 2, 2, 2, 3, 3))
    if rng.random() < 0.25:  # the start itself is a multiplication (counts as a step)
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        sentences, lines, value = [rng.choice(_START_MUL).format(a=a, b=b, **fields)], [f"{a} * {b} = {a * b}"], a * b
    else:
        value = rng.randint(2, 60)
        sentences, lines = [rng.choice(_START).format(a=value, **fields)], []
    share_last = rng.random() < 0.2
    while len(lines) < steps - share_last or not (lines or _divisors(value)):
        op = rng.choice(("+", "+", "-", "-", "*", "packs"))
        picked = _step(op, value, rng)
        if picked is None:
            continue
        b, c, new = picked
        sentence = rng.choice(_STEPS[op]).format(b=b, c=c, **fields)
        if sentence in sentences or (op == "*" and any(" * " in line for line in lines)):
            continue  # no sentence twice, and at most one "times as many" step: numbers stay small
        sentences.append(sentence)
        lines.append(f"{b} * {c} = {b * c}\n{value} + {b * c} = {new}" if op == "packs"
                     else f"{value} {op} {b} = {new}")
        value = new
    divisors = _divisors(value)
    if (share_last or not lines) and divisors:
        b = rng.choice(divisors)
        sentences.append(rng.choice(_SHARE).format(b=b, **fields))
        lines.append(f"{value} / {b} = {value // b}")
        value //= b
    else:
        sentences.append(rng.choice(_QUESTIONS).format(**fields))
    return Problem(" ".join(sentences), str(value), "\n".join(lines + [f"#### {value}"]),
                   _wrong_solution(lines, value, rng), len(lines))


def _wrong_solution(lines: list[str], value: int, rng: random.Random) -> str:
    """The same working with the last result off by a little: a plausible slip, for preference `rejected`."""
    wrong = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
    last = lines[-1].rsplit("= ", 1)[0] + f"= {wrong}"
    return "\n".join(lines[:-1] + [last, f"#### {wrong}"])


def generate_problems(n: int = _POOL_SIZE, seed: int = _SEED) -> list[Problem]:
    """`n` problems with distinct questions, always the same ones for the same seed."""
    from posttrain.data import arith

    return arith.generate_problems(n, seed, make=_make_problem)


@functools.cache
def _pool() -> tuple[Problem, ...]:
    return tuple(generate_problems())


def _prompt(p: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{p.question}\n{INSTRUCTION}"}]


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _rows(kind: str, problems, rng: random.Random) -> list[dict]:
    rows = []
    for p in problems:
        row = {"prompt": _prompt(p), "answer": p.answer, "steps": p.steps}
        if kind == "sft":
            row["completion"] = _reply(p.solution)
        elif kind == "pref":
            row.update(chosen=_reply(p.solution), rejected=_reply(p.wrong))
        elif kind == "kto":
            label = rng.random() < 0.5
            row.update(completion=_reply(p.solution if label else p.wrong), label=label)
        else:
            row["solution"] = p.solution
        rows.append(row)
    return rows


# ---- everyday chat requests (the drift check) -------------------------------------------------------------------

_CHAT_TEMPLATES = (
    "Write a short poem about {topic} for {person}.", "Give me {count} tips for {activity}.",
    "Explain what {thing} is to {audience}.", "Suggest a name for a {pet} that loves {topic}.",
    "Write one friendly sentence inviting {person} to {activity}.", "What should I pack for {activity} in {season}?",
    "Describe {topic} in {count} sentences.", "Write a short thank-you note to {person} who helped with {chore}.",
    "Why do people enjoy {activity}?", "Give me a simple recipe idea with {food} and {food2}.")
_TOPICS = ("the ocean", "autumn leaves", "a rainy morning", "the moon", "a quiet library", "mountains", "a city park",
           "winter", "a lighthouse", "the desert")
_ACTIVITIES = ("hiking", "learning to cook", "a picnic", "camping", "studying for exams", "gardening",
               "a long train trip", "painting", "visiting a museum", "running a first race")
_THINGS = ("a rainbow", "a volcano", "the internet", "a library card", "gravity", "a battery", "a compass",
           "photosynthesis", "a calendar", "a map")
_PEOPLE = ("my grandmother", "a new colleague", "my best friend", "a neighbour", "my teacher", "my little brother")
_AUDIENCES = ("a child", "a teenager", "my grandfather", "a tourist")
_COUNTS = ("two", "three", "four", "five")
_SEASONS = ("spring", "summer", "autumn", "winter")
_PETS = ("cat", "dog", "parrot", "hamster", "goldfish")
_CHORES = ("moving boxes", "watering the plants", "fixing a bike", "carrying groceries", "painting a fence")
_FOODS = ("rice", "tomatoes", "eggs", "lentils", "potatoes", "spinach", "apples", "bread")


@functools.cache
def chat_prompts() -> tuple[str, ...]:
    """300 distinct everyday requests (from ~450 possible), always the same ones in the same order."""
    rng, seen, out = random.Random(_SEED + 7), set(), []
    for _ in range(100_000):
        if len(out) == 300:
            return tuple(out)
        food, food2 = rng.sample(_FOODS, 2)
        text = rng.choice(_CHAT_TEMPLATES).format(
            topic=rng.choice(_TOPICS), activity=rng.choice(_ACTIVITIES), thing=rng.choice(_THINGS),
            person=rng.choice(_PEOPLE), audience=rng.choice(_AUDIENCES), count=rng.choice(_COUNTS),
            season=rng.choice(_SEASONS), pet=rng.choice(_PETS), chore=rng.choice(_CHORES), food=food, food2=food2)
        if text not in seen:
            seen.add(text)
            out.append(text)
    raise RuntimeError("the chat templates give fewer than 300 distinct prompts")  # a bug in this module, not input


# ---- the registry ---------------------------------------------------------------------------------------------

BUILTIN_DATASETS: dict[str, str] = {
    "posttrain/wordmath-sft": "prompt-completion (conversational): `prompt`, `completion` (worked solution), `answer`",
    "posttrain/wordmath-pref": "preference (conversational): `prompt`, `chosen`, `rejected` (last result off), `answer`",
    "posttrain/wordmath-kto": "unpaired preference (conversational): `prompt`, `completion`, `label`, `answer`",
    "posttrain/wordmath-prompts": "prompt-only for online RL (conversational): `prompt`, `answer`, `solution`",
    "posttrain/chat-prompts": "everyday chat requests (conversational prompt-only): `prompt` — the drift check",
}


CONFIGS = ("conversational", "1-step", "2-step", "3-step")


def build(name: str, config: str | None = None) -> datasets.DatasetDict:
    """The DatasetDict (train, test) of one built-in data set of this module.

    `config` "conversational" (the default) is every question; "1-step", "2-step" or "3-step" keeps only the
    questions of that many arithmetic steps, in both splits (a curriculum: RL from a model that is right on the
    easy questions only). The chat prompts have no configs.
    """
    config = config or "conversational"
    if config not in CONFIGS or (name == "posttrain/chat-prompts" and config != "conversational"):
        allowed = "'conversational'" if name == "posttrain/chat-prompts" else ", ".join(repr(c) for c in CONFIGS)
        raise UserError(f"Unknown config {config!r} for {name!r} (a conversational data set); use one of: {allowed}.")
    if name == "posttrain/chat-prompts":
        rows = [{"prompt": [{"role": "user", "content": text}]} for text in chat_prompts()]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:100]),
                                     "test": datasets.Dataset.from_list(rows[100:])})
    kind = name.rsplit("-", 1)[1]
    pool = _pool()
    start, stop = _SLICES["pref" if kind == "kto" else kind]
    out = {}
    for offset, (split, chunk) in enumerate((("train", pool[start:stop]), ("test", pool[3000:4000]))):
        rows = _rows(kind, chunk, random.Random(_SEED + 1 + offset))
        if config != "conversational":
            rows = [row for row in rows if row["steps"] == int(config[0])]
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)
