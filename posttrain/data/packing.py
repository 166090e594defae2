"""Packing tokenised documents into rows of at most `max_length` tokens, with the document boundaries kept.

Strategies (`pack_dataset(..., strategy=)`):
  * "bfd"       Best-Fit-Decreasing bin packing over the WHOLE dataset (TRL packs per 1000-row map batch, which
                wastes more room). A document longer than `max_length` is truncated (its start is kept).
  * "bfd_split" the same, but an over-long document is cut into `max_length` pieces packed independently: no token
                is lost, a piece may start mid-conversation.
  * "wrapped"   concatenate every document in order and cut every `max_length` tokens. Unlike TRL's wrapped rows
                (one block, cross-document attention), ours still record the document pieces in `seq_lengths`, so
                the collator restarts `position_ids` per piece and documents never attend to each other.
Every packed row carries the packed columns concatenated plus `seq_lengths` (the lengths of its documents, in order,
summing to the row length). Other columns are dropped; zero-length documents are dropped.

Token data never goes through Python lists: lengths come from the Arrow offsets, each strategy yields "pieces"
(document, start, length) in output order, and one vectorised gather builds the rows. Only BFD's placement loop is
Python, O(n log max_length) with a segment tree.

Not here: tokenisation and truncation of unpacked rows (`data/tokenize.py`, `data/prepare.py`), turning
`seq_lengths` into position_ids and labels (`data/collators.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posttrain.errors import UserError

STRATEGIES = ("bfd", "bfd_split", "wrapped")
# Streaming datasets cannot be seen whole, so they are packed per batch of this many documents (as TRL does).
ITERABLE_BATCH_SIZE = 1000


class _CapacityTree:
    """Max segment tree over remaining capacities 0..capacity; leaf c holds c while some bin has c tokens free.

    Because a present leaf's value equals its index, "leftmost leaf with value >= n" is exactly "smallest remaining
    capacity that still fits n", found in one root-to-leaf walk.
    """

    def __init__(self, capacity: int):
        self.size = 1 << capacity.bit_length()  # > capacity, so leaves 0..capacity all exist
        self.tree = [0] * (2 * self.size)

    def set(self, leaf: int, value: int) -> None:
        i = leaf + self.size
        self.tree[i] = value
        i >>= 1
        while i:
            best = max(self.tree[2 * i], self.tree[2 * i + 1])
            if self.tree[i] == best:  # ancestors are unchanged too
                break
            self.tree[i] = best
            i >>= 1

    def smallest_fitting(self, need: int) -> int:
        tree, node = self.tree, 1
        while node < self.size:
            node *= 2
            if tree[node] < need:
                node += 1
        return node - self.size


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-Fit-Decreasing bin packing: bins (lists of indices into `lengths`) whose lengths sum to <= capacity.

    Documents are taken longest first (ties in index order); each goes into the open bin with the least room that
    still fits it, else into a new bin. Among bins with equal room the most recently filled one wins (a stack; any
    choice gives the same bin loads). Bins are returned in opening order, indices in placement order. Deterministic.
    Every length must be in 1..capacity (truncate or split first).
    """
    if capacity < 1:
        raise UserError(f"capacity must be >= 1, got {capacity}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise UserError(f"Every length must be in 1..{capacity}; got min {lengths.min()}, max {lengths.max()}.")
    order = np.argsort(-lengths, kind="stable")
    tree = _CapacityTree(capacity)
    tree.set(capacity, capacity)  # an empty bin is always available
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> stack of bin ids
    bins: list[list[int]] = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        room = tree.smallest_fitting(length)
        if room == capacity:  # only fresh bins have full room: every document has length >= 1
            bin_id = len(bins)
            bins.append([])
        else:
            stack = by_room[room]
            bin_id = stack.pop()
            if not stack:
                tree.set(room, 0)
        bins[bin_id].append(index)
        left = room - length
        if left:  # a full bin can take nothing more: forget it
            if not by_room[left]:
                tree.set(left, left)
            by_room[left].append(bin_id)
    return bins


def _pieces_bfd(lengths: np.ndarray, max_length: int, split: bool):
    """(doc, start, length, row) of every piece, for the two BFD strategies, in output order."""
    docs = np.flatnonzero(lengths > 0)
    if split:
        counts = -(-lengths[docs] // max_length)
        doc = np.repeat(docs, counts)
        first = np.cumsum(counts) - counts
        start = (np.arange(doc.size) - np.repeat(first, counts)) * max_length
        size = np.minimum(lengths[doc] - start, max_length)
    else:
        doc, start, size = docs, np.zeros_like(docs), np.minimum(lengths[docs], max_length)
    bins = best_fit_decreasing(size, max_length)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=doc.size)
    row = np.repeat(np.arange(len(bins)), [len(b) for b in bins])
    return doc[order], start[order], size[order], row


def _pieces_wrapped(lengths: np.ndarray, max_length: int):
    """(doc, start, length, row): documents laid end to end and cut at every multiple of max_length."""
    docs = np.flatnonzero(lengths > 0)
    doc_len = lengths[docs]
    begin = np.cumsum(doc_len) - doc_len  # global position of each document's first token
    counts = (begin + doc_len - 1) // max_length - begin // max_length + 1  # rows each document touches
    doc = np.repeat(docs, counts)
    first = np.cumsum(counts) - counts
    k = np.arange(doc.size) - np.repeat(first, counts)  # piece number inside its document
    row = np.repeat(begin // max_length, counts) + k
    piece_begin = np.maximum(np.repeat(begin, counts), row * max_length)
    piece_end = np.minimum(np.repeat(begin + doc_len, counts), (row + 1) * max_length)
    return doc, piece_begin - np.repeat(begin, counts), piece_end - piece_begin, row


def _gather(column: pa.Array, doc, start, size, row_offsets) -> pa.Array:
    """One list column rebuilt from pieces: a single vectorised take over the flat token values."""
    doc_offsets = np.cumsum(pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False))
    doc_offsets = np.concatenate([[0], doc_offsets[:-1]])
    piece_first = np.cumsum(size) - size
    index = np.repeat(doc_offsets[doc] + start - piece_first, size) + np.arange(int(size.sum()))
    values = pc.take(column.flatten(), pa.array(index))
    list_type = pa.LargeListArray if pa.types.is_large_list(column.type) else pa.ListArray
    offsets_type = pa.int64() if list_type is pa.LargeListArray else pa.int32()
    return list_type.from_arrays(pa.array(row_offsets, type=offsets_type), values)


def _document_lengths(table: pa.Table, columns: list[str]) -> np.ndarray:
    lengths = None
    for name in columns:
        current = pc.list_value_length(table.column(name)).fill_null(0).to_numpy(zero_copy_only=False)
        if lengths is not None and not np.array_equal(lengths, current):
            bad = int(np.flatnonzero(lengths != current)[0])
            raise UserError(f"Row {bad}: column '{name}' has {current[bad]} entries but '{columns[0]}' has "
                            f"{lengths[bad]}; packed columns must have equal lengths per row.")
        lengths = current
    return lengths.astype(np.int64)


def _pack_table(table: pa.Table, max_length: int, strategy: str, columns: Sequence[str]) -> pa.Table:
    """Pack one Arrow table (the whole dataset, or one streaming batch)."""
    present = [c for c in columns if c in table.column_names]
    lengths = _document_lengths(table, present)
    if strategy == "wrapped":
        doc, start, size, row = _pieces_wrapped(lengths, max_length)
    else:
        doc, start, size, row = _pieces_bfd(lengths, max_length, split=strategy == "bfd_split")
    num_rows = int(row[-1]) + 1 if row.size else 0
    row_len = np.bincount(row, weights=size, minlength=num_rows).astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_len)])
    piece_offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=num_rows))])
    out = {name: _gather(table.column(name).combine_chunks(), doc, start, size, row_offsets) for name in present}
    out["seq_lengths"] = pa.ListArray.from_arrays(pa.array(piece_offsets, type=pa.int32()),
                                                  pa.array(size, type=pa.int64()))
    return pa.table(out)


def pack_dataset(dataset: datasets.Dataset, max_length: int, strategy: str = "bfd",
                 columns: Sequence[str] = ("input_ids", "completion_mask")) -> datasets.Dataset:
    """Pack the list columns `columns` of a tokenised dataset into rows of <= max_length tokens (+ `seq_lengths`).

    Columns of `columns` missing from the dataset are skipped (at least one must exist); every other column is
    dropped. A `datasets.IterableDataset` is packed per batch of ITERABLE_BATCH_SIZE documents.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"Unknown packing strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}.")
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"Packing needs a positive integer max_length (the row length), got {max_length!r}.")
    names = dataset.column_names
    present = [c for c in columns if names is None or c in names]
    if not present:
        raise UserError(f"pack_dataset found none of the columns {list(columns)} in the dataset (it has {names}); "
                        "tokenise it first.")
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise UserError("Cannot pack an empty dataset; give at least one tokenised example.")
        packed = dataset.with_format("arrow").map(
            _pack_table, batched=True, batch_size=None, remove_columns=names, desc=f"Packing dataset ({strategy})",
            fn_kwargs={"max_length": max_length, "strategy": strategy, "columns": present})
        if len(packed) == 0:
            raise UserError("Cannot pack: every example has zero tokens.")
        return packed.with_format(dataset.format["type"])
    # Streaming: `remove_columns` would also remove our re-created columns there, so select instead.
    source = dataset.select_columns(present) if names is not None else dataset
    return source.with_format("arrow").map(
        _pack_table, batched=True, batch_size=ITERABLE_BATCH_SIZE,
        fn_kwargs={"max_length": max_length, "strategy": strategy, "columns": present}).with_format(None)


def packing_efficiency(dataset, max_length: int, column: str = "input_ids") -> float:
    """Fraction of the rows x max_length grid holding real tokens (rows longer than max_length count max_length)."""
    if len(dataset) == 0:
        raise UserError("packing_efficiency of an empty dataset is undefined.")
    table = dataset.with_format("arrow")[:]
    lengths = pc.list_value_length(table.column(column)).fill_null(0).to_numpy(zero_copy_only=False)
    return float(np.minimum(lengths, max_length).sum() / (len(lengths) * max_length))


def _truncate_table(table: pa.Table, max_length: int) -> pa.Table:
    columns = [pc.list_slice(col, 0, max_length) if pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
               else col for col in table.columns]
    return pa.Table.from_arrays(columns, names=table.column_names)


def truncate_dataset(dataset, max_length: int, map_kwargs: dict | None = None):
    """Every list column (input_ids, attention_mask, …) cut to its first `max_length` items; other columns kept.
    Works on a Dataset, DatasetDict or IterableDataset and keeps its output format; `map_kwargs` go to `map`."""
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"truncate_dataset needs a positive integer max_length, got {max_length!r}.")
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({k: truncate_dataset(v, max_length, map_kwargs) for k, v in dataset.items()})
    truncated = dataset.with_format("arrow").map(_truncate_table, batched=True, fn_kwargs={"max_length": max_length},
                                                 **(map_kwargs or {}))
    return keep_format(truncated, dataset)


def keep_format(result, source, added: Sequence[str] = ()):
    """`result` in `source`'s output format (type, its options, selected columns plus the `added` ones)."""
    if isinstance(source, datasets.Dataset):
        fmt = source.format
        columns = fmt["columns"]
        if columns is not None:
            columns = [c for c in [*columns, *added] if c in result.column_names]
        return result.with_format(fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"],
                                  **fmt["format_kwargs"])
    formatting = getattr(source, "_formatting", None)
    return result.with_format(formatting.format_type if formatting is not None else None)
