"""Dataset types and formats, detected from columns and rows (TRL's taxonomy), and the conversions between them.

Types: language_modeling (`text` or `messages`), prompt_only (`prompt`), prompt_completion (`prompt`, `completion`),
preference (`prompt`, `chosen`, `rejected`), preference_implicit (`chosen`, `rejected`), unpaired_preference
(`prompt`, `completion`, `label`). Format: standard (strings) or conversational (lists of {role, content}).
ShareGPT rows (`conversations` of {from, value}) are converted to `messages`.

Not here: tokenisation (`data/tokenize.py`) and per-trainer pipelines (`data/prepare.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from posttrain.errors import UserError

DATASET_TYPES: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "preference_implicit": ("chosen", "rejected"),
    "language_modeling": ("text",),
    "language_modeling_conversational": ("messages",),
    "prompt_only": ("prompt",),
}
_CONVERSATIONAL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


def is_conversational(example: dict[str, Any]) -> bool:
    """True when a prompt/chosen/rejected/completion/messages field is a list of {role, content} messages."""
    for key in _CONVERSATIONAL_KEYS:
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


def is_sharegpt(example: dict[str, Any]) -> bool:
    value = example.get("conversations")
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def sharegpt_to_messages(example: dict[str, Any]) -> dict[str, Any]:
    """{"conversations": [{"from": "human", "value": …}, …]} → {"messages": [{"role": "user", "content": …}, …]}."""
    messages = []
    for turn in example["conversations"]:
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserError(f"Unknown ShareGPT speaker {turn['from']!r}; expected one of {sorted(_SHAREGPT_ROLES)}.")
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def detect_type(columns: Iterable[str], text_field: str = "text") -> str | None:
    """The dataset type implied by its columns (most specific first), or None."""
    cols = set(columns)
    for name, needed in DATASET_TYPES.items():
        needed = tuple(text_field if c == "text" else c for c in needed)
        if set(needed) <= cols:
            return "language_modeling" if name == "language_modeling_conversational" else name
    return None


def require_type(columns: Sequence[str], accepted: Sequence[str], who: str, text_field: str = "text") -> str:
    """The detected type if `who` accepts it, else a ValueError naming the expected columns and near misses."""
    kind = detect_type(columns, text_field)
    if kind in accepted:
        return kind
    expected = []
    for name in accepted:
        for key in (name, name + "_conversational"):
            if key in DATASET_TYPES:
                cols = [text_field if c == "text" else c for c in DATASET_TYPES[key]]
                expected.append(" + ".join(f"'{c}'" for c in cols))
    hints = []
    for col in columns:
        close = difflib.get_close_matches(col, [text_field, "messages", "prompt", "completion", "chosen",
                                                "rejected", "label", "conversations"], n=1, cutoff=0.6)
        if close and close[0] != col:
            hints.append(f"'{col}' → '{close[0]}'?")
    hint = f" Did you mean: {', '.join(hints)}" if hints else ""
    raise UserError(f"{who} expects a dataset with columns {' or '.join(expected)}; got columns "
                    f"{list(columns)}.{hint} Rename columns with dataset.rename_column(old, new).")


def extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """Implicit → explicit prompt: the longest common prefix of chosen and rejected becomes the prompt.

    Conversational rows split on whole messages; standard rows on characters, backed off so that the completion
    starts at a whitespace character (no word is cut, and tokens keep their leading space).
    """
    chosen, rejected = example["chosen"], example["rejected"]
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        # Split where the completion starts with whitespace: BPE tokens carry their leading space, so
        # "…Answer: 4" + " - 1 = 3" tokenises as the joined text does ("…Answer: 4 " + "- 1 = 3" would not).
        while 0 < n < len(chosen) and not chosen[n].isspace():
            n -= 1
    elif n == limit:  # identical conversations up to the shorter one: keep at least one message as completion
        n -= 1
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def maybe_extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """`extract_prompt` for implicit-prompt preference rows; other rows unchanged. A row that has a `prompt` but
    whose chosen/rejected are conversations while the prompt is text (or the reverse) has its prompt inside
    chosen/rejected: that prompt column is replaced by the extracted one."""
    if "chosen" not in example or "rejected" not in example:
        return example
    if "prompt" in example and (is_conversational({"chosen": example["chosen"]})
                                == is_conversational({"prompt": example["prompt"]})):
        return example
    return extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})


def unpair_preference(batch: dict[str, list], keep_other_columns: bool = False) -> dict[str, list]:
    """Batched map: each (prompt, chosen, rejected) row → a desirable and an undesirable (prompt, completion, label).
    Without a `prompt` column (implicit prompt) the rows have no prompt either. Other columns (tools,
    chat_template_kwargs, …) are copied to both rows.

    keep_other_columns=False (the KTO pipeline): each pair's two rows are adjacent.
    keep_other_columns=True (`data_utils.unpair_preference_dataset`, TRL's order): the batch's desirable rows, then
    its undesirable rows."""
    n = len(batch["chosen"])
    extra = [k for k in batch if k not in ("chosen", "rejected", "completion", "label")]  # prompt included
    if keep_other_columns:
        out = {k: list(batch[k]) + list(batch[k]) for k in extra}
        out.update(completion=list(batch["chosen"]) + list(batch["rejected"]), label=[True] * n + [False] * n)
        return out
    out: dict[str, list] = {"completion": [], "label": [], **{k: [] for k in extra}}
    for i, (chosen, rejected) in enumerate(zip(batch["chosen"], batch["rejected"])):
        out["completion"] += [chosen, rejected]
        out["label"] += [True, False]
        for key in extra:
            out[key] += [batch[key][i], batch[key][i]]
    return out


def prepare_multimodal_messages(messages: list[dict[str, Any]], images: list | None = None) -> list[dict[str, Any]]:
    """Messages with string contents → structured contents ([{"type": "text", "text": …}]), with one
    {"type": "image", "image": img} block per image placed before the text of the first user message with string
    content. Already-structured contents are kept; image blocks without an "image" get the images in order. The
    number of unfilled image blocks must equal len(images). The input messages are not modified."""
    images = list(images or [])
    out, placed = [], False
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"Invalid role in message: {role!r}; expected 'system', 'user', 'assistant' or 'tool'.")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
            if role == "user" and not placed:
                blocks = [{"type": "image"} for _ in images] + blocks
                placed = True
            message = {**message, "content": blocks}
        out.append(message)
    slots = [(i, j) for i, m in enumerate(out) if m["role"] != "tool" and isinstance(m.get("content"), list)
             for j, block in enumerate(m["content"]) if block.get("type") == "image" and "image" not in block]
    if len(slots) != len(images):
        raise ValueError(f"Number of images provided ({len(images)}) does not match number of image placeholders "
                         f"({len(slots)}).")
    for (i, j), image in zip(slots, images):
        content = list(out[i]["content"])
        content[j] = {**content[j], "image": image}
        out[i] = {**out[i], "content": content}
    return out


def maybe_convert_to_chatml(example: dict[str, Any]) -> dict[str, Any]:
    """Messages of {from, value} (ShareGPT) in prompt/completion/chosen/rejected/messages/conversations → {role,
    content}, speakers mapped to roles (human → user, gpt → assistant; others kept), and `conversations` renamed
    `messages`; other rows unchanged. Returns a new row."""
    out = dict(example)
    for key in ("prompt", "completion", "chosen", "rejected", "messages", "conversations"):
        if isinstance(out.get(key), list):
            out[key] = [_chatml_message(m) if isinstance(m, dict) else m for m in out[key]]
    if "conversations" in out:
        out["messages"] = out.pop("conversations")
    return out


def _chatml_message(message: dict[str, Any]) -> dict[str, Any]:
    message = dict(message)
    if "from" in message:
        speaker = message.pop("from")
        message["role"] = _SHAREGPT_ROLES.get(speaker, speaker)
    if "value" in message:
        message["content"] = message.pop("value")
    return message
