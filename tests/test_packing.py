"""Packing: hand-checked bins and rows for every strategy, random invariants, edge cases and a speed guard."""

import time

import datasets
import numpy as np
import pyarrow as pa
import pytest

from posttrain.data.packing import best_fit_decreasing, pack_dataset, packing_efficiency

datasets.disable_progress_bars()


def _first_fit(lengths, capacity):
    """Plain first fit in the given order (no sorting): the baseline BFD must not lose to."""
    loads = []
    for length in lengths:
        for b, load in enumerate(loads):
            if load + length <= capacity:
                loads[b] += length
                break
        else:
            loads.append(length)
    return loads


def _naive_best_fit_loads(lengths, capacity):
    """O(n * bins) best fit decreasing; tie-breaking aside it must give the same bin loads as the segment tree."""
    loads = []
    for length in sorted(lengths, reverse=True):
        fitting = [b for b, load in enumerate(loads) if load + length <= capacity]
        if fitting:
            loads[min(fitting, key=lambda b: capacity - loads[b])] += length
        else:
            loads.append(length)
    return sorted(loads)


def _dataset(docs, **extra):
    return datasets.Dataset.from_dict({"input_ids": docs, "completion_mask": [[t % 2 for t in d] for d in docs],
                                       **extra})


DOCS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]


# ---------------------------------------------------------------------------------------------------- bins
def test_best_fit_decreasing_hand_example():
    # longest first: 7 -> new bin (room 1); 5 -> new (room 3); 4 -> new (room 4); 3 -> room 3; 2 -> room 4; 1 -> room 1
    assert best_fit_decreasing([3, 7, 2, 5, 4, 1], 8) == [[1, 5], [3, 0], [4, 2]]


def test_best_fit_differs_from_first_fit():
    # 7 -> bin 0 (room 3); 4 -> bin 1 (room 6); 4 -> bin 1 (room 2); 2 -> bin 1, the tightest fit, where
    # first-fit-decreasing would take bin 0 (room 3) and end with loads 9 + 8 instead of 7 + 10.
    assert best_fit_decreasing([7, 4, 2, 4], 10) == [[0], [1, 3, 2]]


def test_best_fit_ties_keep_index_order_and_empty_input():
    assert best_fit_decreasing([2, 2, 2], 2) == [[0], [1], [2]]
    assert best_fit_decreasing([], 4) == []


@pytest.mark.parametrize("lengths, capacity", [([5], 4), ([0, 1], 4), ([1], 0)])
def test_best_fit_rejects_bad_lengths(lengths, capacity):
    with pytest.raises(ValueError):
        best_fit_decreasing(lengths, capacity)


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_invariants(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(16, 200))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 400))).tolist()
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each document exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= capacity
    assert -(-sum(lengths) // capacity) <= len(bins) <= len(_first_fit(lengths, capacity))
    # any-fit property: a bin was opened only because its first document fitted no earlier bin
    for j, b in enumerate(bins):
        assert all(loads[i] + lengths[b[0]] > capacity for i in range(j))
    assert sorted(loads) == _naive_best_fit_loads(lengths, capacity)


# ---------------------------------------------------------------------------------------------------- rows
def test_pack_bfd_truncates_long_documents():
    packed = pack_dataset(_dataset(DOCS, text=["a", "b", "c"]), 5, "bfd")
    assert packed.column_names == ["input_ids", "completion_mask", "seq_lengths"]  # 'text' dropped
    assert packed[:] == {"input_ids": [[4, 5, 6, 7, 8], [1, 2, 3, 11, 12]],
                         "completion_mask": [[0, 1, 0, 1, 0], [1, 0, 1, 1, 0]],
                         "seq_lengths": [[5], [3, 2]]}


def test_pack_bfd_split_keeps_every_token():
    packed = pack_dataset(_dataset(DOCS), 5, "bfd_split")
    # pieces 3, 5, 2 (tail 9,10), 2: the 5 fills a row, the 3 opens one, both 2s go where they fit best
    assert packed["input_ids"] == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10], [11, 12]]
    assert packed["seq_lengths"] == [[5], [3, 2], [2]]
    assert packed["completion_mask"] == [[0, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 0]]


def test_pack_wrapped_records_document_pieces():
    packed = pack_dataset(_dataset(DOCS), 5, "wrapped")
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert packed["seq_lengths"] == [[3, 2], [5], [2]]


def test_pack_input_ids_only_and_lazy_indices():
    ds = datasets.Dataset.from_dict({"input_ids": DOCS + [[99]], "label": [0, 1, 2, 3]})
    ds = ds.select([3, 2, 1, 0])  # an indices mapping, as after shuffle/filter
    packed = pack_dataset(ds, 8, "bfd")
    assert packed.column_names == ["input_ids", "seq_lengths"]
    assert packed["input_ids"] == [[4, 5, 6, 7, 8, 9, 10, 99], [1, 2, 3, 11, 12]]
    assert packed["seq_lengths"] == [[7, 1], [3, 2]]


def test_pack_iterable_dataset_per_batch():
    ds = _dataset(DOCS).to_iterable_dataset()
    rows = list(pack_dataset(ds, 5, "bfd_split"))
    assert [r["input_ids"] for r in rows] == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10], [11, 12]]
    assert [r["seq_lengths"] for r in rows] == [[5], [3, 2], [2]]


def test_pack_drops_empty_documents():
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": [[], [1, 2], []]}), 4, "bfd")
    assert packed[:] == {"input_ids": [[1, 2]], "seq_lengths": [[2]]}


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "ffd"}, "Unknown packing strategy"),
    ({"max_length": 0}, "positive integer"),
    ({"columns": ("tokens",)}, "none of the columns"),
])
def test_pack_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_dataset(_dataset(DOCS), **{"max_length": 4, **kwargs})


def test_pack_errors_on_empty_and_mismatched():
    with pytest.raises(ValueError, match="empty dataset"):
        pack_dataset(_dataset(DOCS).select([]), 4)
    bad = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "completion_mask": [[1]]})
    with pytest.raises(ValueError, match="equal lengths"):
        pack_dataset(bad, 4)


def _random_docs(seed, n=300, low=1, high=90):
    """Documents of unique consecutive token ids, so every token can be traced back."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high, size=n)
    ends = np.cumsum(lengths)
    return [list(range(e - n_, e)) for e, n_ in zip(ends.tolist(), lengths.tolist())]


def _row_pieces(packed):
    for ids, mask, lengths in zip(packed["input_ids"], packed["completion_mask"], packed["seq_lengths"]):
        assert sum(lengths) == len(ids) == len(mask)
        assert mask == [t % 2 for t in ids]  # completion_mask travelled with its tokens
        cuts = np.cumsum([0] + lengths)
        yield from (ids[a:b] for a, b in zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("seed", range(3))
def test_bfd_split_and_wrapped_keep_every_token_once(seed):
    docs, max_length = _random_docs(seed), 64
    total = sum(map(len, docs))
    for strategy in ("bfd_split", "wrapped"):
        packed = pack_dataset(_dataset(docs), max_length, strategy)
        assert all(len(r) <= max_length for r in packed["input_ids"])
        flat = sorted(t for r in packed["input_ids"] for t in r)
        assert flat == list(range(total))
        pieces = list(_row_pieces(packed))
        assert all(p == list(range(p[0], p[0] + len(p))) for p in pieces)  # a piece is a contiguous slice
        starts = {d[0] for d in docs}
        # a piece never spans two documents: only its first token may be a document start
        assert all(not (set(p[1:]) & starts) for p in pieces)
    wrapped = pack_dataset(_dataset(docs), max_length, "wrapped")["input_ids"]
    assert [t for r in wrapped for t in r] == list(range(total))
    assert all(len(r) == max_length for r in wrapped[:-1])


@pytest.mark.parametrize("seed", range(3))
def test_bfd_truncates_to_document_prefixes(seed):
    docs, max_length = _random_docs(seed, high=120), 64
    packed = pack_dataset(_dataset(docs), max_length, "bfd")
    pieces = sorted(_row_pieces(packed))
    assert pieces == sorted(d[:max_length] for d in docs)
    assert len(packed) == len(best_fit_decreasing([min(len(d), max_length) for d in docs], max_length))


def test_packing_efficiency():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * 4, [1] * 2, [1] * 9]})
    assert packing_efficiency(ds, 8) == pytest.approx((4 + 2 + 8) / 24)
    packed = pack_dataset(ds, 8, "bfd")
    assert packing_efficiency(packed, 8) == pytest.approx((8 + 6) / 16)


def test_bfd_packs_100k_short_documents_fast():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 64, size=100_000)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.arange(int(lengths.sum()), dtype=np.int32))
    ds = datasets.Dataset(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, values)}))
    start = time.perf_counter()
    packed = pack_dataset(ds, 1024, "bfd")
    elapsed = time.perf_counter() - start
    assert packing_efficiency(packed, 1024) > 0.999
    assert elapsed < 15, f"packing 100k documents took {elapsed:.1f}s"
