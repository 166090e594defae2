"""A synthetic visual task drawn with PIL, offline, for demos and tests of vision-language training.

Each example is a 32x32 image holding one filled shape (square, circle or triangle) of one of six colours, at a
random place and size (a third to two thirds of the side) on a random grey background with pixel noise
(1 pixel in 32), and the question "What colour is the shape?".
Rows come in TRL's vision format: an `images` column (one PIL image), a conversational `prompt`, and either a
`completion` (SFT), or the `answer` column that the reward `colour_reward` checks (GRPO/RLOO). Splits are
seeded, so train and test never share a seed.

Not here: image handling in general (`data/vision.py`).
"""

from __future__ import annotations

import random

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 210, 30),
           "purple": (150, 40, 170), "orange": (240, 130, 20)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"


def draw(colour: str, shape: str, rng: random.Random, size: int = 32):
    from PIL import Image, ImageDraw

    grey = rng.randint(60, 200)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size * 2 // 3)
    x, y = rng.randint(0, size - extent - 1), rng.randint(0, size - extent - 1)
    box = (x, y, x + extent, y + extent)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(x, y + extent), (x + extent, y + extent), (x + extent // 2, y)], fill=fill)
    pixels = image.load()
    for _ in range(size * size // 32):  # salt-and-pepper noise
        px, py = rng.randrange(size), rng.randrange(size)
        pixels[px, py] = tuple(rng.randrange(256) for _ in range(3))
    return image


def shapes_dataset(n: int, split: str = "train", kind: str = "sft", seed: int = 0):
    """`n` examples; split "train" and "test" draw from disjoint seeds. kind: "sft" (prompt + completion) or
    "prompt" (prompt + answer, for online training and evaluation)."""
    import datasets

    rng = random.Random(f"{split}-{seed}")
    rows = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        row = {"images": [draw(colour, shape, rng)], "prompt": [{"role": "user", "content": QUESTION}]}
        if kind == "sft":
            row["completion"] = [{"role": "assistant", "content": colour}]
        else:
            row["answer"] = colour
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def answer_of(completion) -> str:
    text = completion[0]["content"] if isinstance(completion, list) else completion
    words = text.strip().lower().split()
    return words[0].strip(".,!") if words else ""


def colour_reward(completions, answer, **kwargs) -> list[float]:
    """1 when the completion's first word is the shape's colour, else 0."""
    return [float(answer_of(c) == a) for c, a in zip(completions, answer)]
