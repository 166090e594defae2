"""TRL's `trl.data_utils` names, at the same path: `from posttrain.data_utils import apply_chat_template, …`.

A thin public module over `posttrain/data`: each name is either the function the trainers use or a wrapper that
gives it TRL's signature (dataset-level calls with `map_kwargs`, DatasetDict support). Where our behaviour
differs from TRL's on purpose, the function says so:

- `extract_prompt` on standard (string) rows backs the split off to a whitespace character, so no word is cut
  (TRL moves at most one space): "Answer: 45" / "Answer: 47" gives prompt "Answer:", not "Answer: 4".
- `pack_dataset` packs the whole dataset at once with "bfd"/"bfd_split" (TRL: per map batch of 1000 rows, which
  wastes more room; results agree on datasets of up to 1000 rows).
- `maybe_convert_to_chatml` maps ShareGPT speakers to roles (human → user, gpt → assistant); TRL keeps the names.

Not here: the per-trainer pipelines (`data/prepare.py`), tokenisation (`data/tokenize.py`).
"""

from __future__ import annotations

from typing import Any

import datasets

from posttrain.data import packing
from posttrain.data.formats import (
    extract_prompt,
    is_conversational,
    is_sharegpt,
    maybe_convert_to_chatml,
    maybe_extract_prompt,
    prepare_multimodal_messages,
    unpair_preference,
)
from posttrain.data.packing import keep_format, truncate_dataset
from posttrain.data.templates import apply_chat_template, clone_chat_template, maybe_apply_chat_template
from posttrain.errors import UserError

__all__ = [
    "apply_chat_template", "clone_chat_template", "extract_prompt", "is_conversational",
    "is_conversational_from_value", "maybe_apply_chat_template", "maybe_convert_to_chatml", "maybe_extract_prompt",
    "maybe_unpair_preference_dataset", "pack_dataset", "prepare_multimodal_messages", "truncate_dataset",
    "unpair_preference_dataset",
]

_DICTS = (datasets.DatasetDict, datasets.IterableDatasetDict)


def is_conversational_from_value(example: dict[str, Any]) -> bool:
    """True for a ShareGPT row: `conversations` is a list of {from, value} messages."""
    return is_sharegpt(example) and "value" in example["conversations"][0]


def _column_names(dataset) -> list[str]:
    if isinstance(dataset, _DICTS):
        dataset = next(iter(dataset.values()))
    names = dataset.column_names
    if names is None:  # a streamed dataset without features: read them off the first row
        names = list(next(iter(dataset)).keys())
    return list(names)


def unpair_preference_dataset(dataset, **map_kwargs: Any):
    """Preference rows (chosen, rejected, and prompt if explicit) → unpaired rows (prompt, completion, label):
    each pair gives a desirable (label True, the chosen completion) and an undesirable row (label False, the
    rejected one); every other column is repeated on both. Per map batch, the desirable rows come first (TRL's
    order). Dataset, DatasetDict or IterableDataset."""
    names = _column_names(dataset)
    missing = [c for c in ("chosen", "rejected") if c not in names]
    if missing:
        raise UserError(f"unpair_preference_dataset needs 'chosen' and 'rejected' columns; {missing} missing from "
                        f"{names}.")
    return dataset.map(unpair_preference, batched=True, remove_columns=names,
                       fn_kwargs={"keep_other_columns": True}, **map_kwargs)


def maybe_unpair_preference_dataset(dataset, num_proc: int | None = None, desc: str | None = None):
    """`unpair_preference_dataset` when the dataset has chosen and rejected columns, else the dataset unchanged."""
    names = _column_names(dataset)
    if "chosen" in names and "rejected" in names:
        return unpair_preference_dataset(dataset, num_proc=num_proc, desc=desc)
    return dataset


def pack_dataset(dataset, seq_length: int, strategy: str = "bfd", map_kwargs: dict[str, Any] | None = None):
    """Pack every column of a tokenised dataset (all must be lists of equal lengths per row: input_ids,
    attention_mask, …) into rows of at most `seq_length`. "bfd" and "bfd_split" (see `data/packing.py`) add
    `seq_lengths`, the document lengths in each row; "wrapped" concatenates everything and cuts every seq_length
    tokens, without document boundaries (as TRL; posttrain's own SFT packing keeps them). The output format
    (numpy, torch, selected columns) is the input's. A DatasetDict is packed split by split. `map_kwargs` may
    only hold `desc`: packing sees the whole dataset in one pass, so batch and process options cannot apply."""
    unknown = sorted(set(map_kwargs or {}) - {"desc"})
    if unknown:
        raise UserError(f"pack_dataset packs the whole dataset in one pass, so map_kwargs {unknown} cannot apply; "
                        "drop them.")
    if isinstance(dataset, _DICTS):
        return type(dataset)({k: pack_dataset(v, seq_length, strategy, map_kwargs) for k, v in dataset.items()})
    names = _column_names(dataset)
    features = getattr(dataset, "features", None)
    if features is not None:
        flat = [n for n in names if not isinstance(features[n], (datasets.Sequence, datasets.List))]
        if flat:
            raise TypeError(f"Packing requires all columns to be lists of lists; {flat} are not (remove them with "
                            "dataset.remove_columns).")
    packed = packing.pack_dataset(dataset, seq_length, strategy, columns=names)
    if strategy == "wrapped":
        packed = packed.remove_columns("seq_lengths")
    return keep_format(packed, dataset, added=() if strategy == "wrapped" else ("seq_lengths",))
