"""Batch collation for language-model training: tokenised examples in, `input_ids` / `labels` / masks out.

Labels follow the Hugging Face convention (the model or loss shifts them): `labels[t] = input_ids[t]` where the token
is trained (`completion_mask` 1, or every real token with completion_only_loss=False), else -100; -100 on padding;
and, wherever several documents share a row (padding-free batches, packed rows with `seq_lengths`), -100 on the
FIRST token of every document, which must not be predicted from the previous document's last token.

Rows holding several documents are told apart by `position_ids` that restart at 0 per document, with NO 2-D
attention_mask: transformers only turns restarting position_ids into a block-diagonal mask (SDPA/eager) or varlen
flash-attention when attention_mask is None AND there is no KV cache. The model MUST therefore be called with
`use_cache=False`: with the default `config.use_cache=True`, Qwen2/Llama-style models build a DynamicCache, the
packed-sequence detection is skipped, and documents silently attend to each other (tests/test_collators.py pins it).

Preference pairs (`DataCollatorForPreference`): B pairs become one batch of 2B rows, chosen rows first, so the
policy runs once for both. Unpaired examples (`DataCollatorForUnpaired`, KTO): B real rows, then B rows pairing
each prompt with another example's completion for the KL baseline.

Not here: packing rows (`data/packing.py`), tokenisation and completion masks (`data/tokenize.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.errors import UserError

IGNORE_INDEX = -100


def _as_1d(value: Any, key: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.long)
    if tensor.dim() != 1:
        raise UserError(f"'{key}' must be one flat sequence per example, got shape {tuple(tensor.shape)}.")
    return tensor


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def _positions(seq_lengths: Sequence[int]) -> torch.Tensor:
    """0..n-1 restarting at every document: arange minus the start of the token's document."""
    lengths = torch.as_tensor(seq_lengths, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)


def _mask_starts(labels: torch.Tensor, seq_lengths: Sequence[int]) -> None:
    """In place: -100 at each document's first token (zero-length documents have none)."""
    lengths = torch.as_tensor(seq_lengths, dtype=torch.long)
    starts = (torch.cumsum(lengths, 0) - lengths)[lengths > 0]
    labels[starts] = IGNORE_INDEX


@dataclass
class DataCollatorForLanguageModeling:
    """Pads (or flattens) tokenised examples into a causal-LM batch.

    Examples are dicts with `input_ids` (list or 1-D tensor), optional `completion_mask` (1 = trained token; all
    ones when absent) or ready-made `labels` (TRL's form: -100 on untrained tokens, used as they are), and optional
    `seq_lengths` (packed rows: document lengths summing to len(input_ids)).

    Padded mode, plain rows: right-pads to the longest row (rounded up to pad_to_multiple_of) and returns
    `input_ids`, `attention_mask`, `labels`, all (B, T).
    Padded mode, any row carrying `seq_lengths`: returns `input_ids`, `position_ids`, `labels` (B, T) and NO
    attention_mask, padding or not. Each row's padding becomes one more pseudo-document whose positions restart at 0
    (labels -100). Why: an attention_mask would switch off transformers' packed-sequence detection and let the
    documents of a row attend to each other; with right padding and a causal model, real tokens never look at the
    later pad tokens anyway, so dropping the mask loses nothing.
    Padding-free mode: the whole batch becomes ONE row (1, N): `input_ids`, `position_ids` restarting per document
    (per `seq_lengths`, else per example), `labels`, no attention_mask. pad_to_multiple_of pads that row with pad
    tokens forming their own trailing document (positions from 0, labels -100). As TRL's collator, it also returns
    the document boundaries the varlen kernels take (flash attention, linear-attention layers): `cu_seq_lens_q` /
    `cu_seq_lens_k` (int32 starts + total), `max_length_q` / `max_length_k` (longest document) and `seq_idx`
    (1, N) (document index of each token).
    `return_position_ids` (padded mode): `position_ids` (0..n-1 per row) beside the attention_mask.

    Fields in TRL's order (pad_token_id, padding_free, return_position_ids, pad_to_multiple_of, return_tensors), then
    posttrain's `completion_only_loss` (False: train every real token despite a completion_mask).
    """

    pad_token_id: int
    padding_free: bool = False
    return_position_ids: bool = False
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    completion_only_loss: bool = True

    def __post_init__(self):
        if self.return_tensors != "pt":
            raise UserError(f"Only return_tensors='pt' is supported, got {self.return_tensors!r}.")
        if self.pad_token_id is None:
            raise UserError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token) first.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise UserError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise UserError("Cannot collate an empty list of examples.")
        rows = [self._row(example) for example in examples]
        if self.padding_free:
            return self._flatten(rows)
        return self._pad(rows, packed=any(example.get("seq_lengths") is not None for example in examples))

    @staticmethod
    def get_position_ids_from_packed_seq_lengths(batch_seq_lengths: list[list[int]]) -> list[torch.Tensor]:
        """TRL's helper: for each example's document lengths, its position ids restarting at 0 per document."""
        return [_positions(lengths) for lengths in batch_seq_lengths]

    def _row(self, example: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
        """(input_ids, labels, seq_lengths or None) of one example; labels not yet masked at document starts."""
        input_ids = _as_1d(example["input_ids"], "input_ids")
        labels = input_ids.clone()
        if example.get("labels") is not None:  # prebuilt labels (TRL's form)
            labels = _as_1d(example["labels"], "labels")
            if labels.shape != input_ids.shape:
                raise UserError(f"labels has {labels.numel()} entries but input_ids has {input_ids.numel()}.")
        elif self.completion_only_loss and example.get("completion_mask") is not None:
            mask = _as_1d(example["completion_mask"], "completion_mask")
            if mask.shape != input_ids.shape:
                raise UserError(f"completion_mask has {mask.numel()} entries but input_ids has {input_ids.numel()}.")
            labels[mask == 0] = IGNORE_INDEX
        seq_lengths = example.get("seq_lengths")
        if seq_lengths is not None:
            seq_lengths = _as_1d(seq_lengths, "seq_lengths").tolist()
            if sum(seq_lengths) != input_ids.numel() or min(seq_lengths, default=0) < 0:
                raise UserError(f"seq_lengths {seq_lengths} must be non-negative and sum to the row length "
                                f"{input_ids.numel()}.")
        return input_ids, labels, seq_lengths

    def _pad(self, rows, packed: bool) -> dict[str, torch.Tensor]:
        width = _round_up(max(ids.numel() for ids, _, _ in rows), self.pad_to_multiple_of)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        side = "position_ids" if packed else "attention_mask"
        out = {"input_ids": input_ids, side: torch.zeros((batch, width), dtype=torch.long), "labels": labels}
        for i, (ids, row_labels, seq_lengths) in enumerate(rows):
            n = ids.numel()
            input_ids[i, :n], labels[i, :n] = ids, row_labels
            if packed:  # the padding tail is one more document, so its positions restart too
                seq_lengths = seq_lengths if seq_lengths is not None else [n]
                _mask_starts(labels[i, :n], seq_lengths)
                out["position_ids"][i] = _positions(seq_lengths + [width - n])
            else:
                out["attention_mask"][i, :n] = 1
        if self.return_position_ids and not packed:  # 0..n-1 on each row's tokens, 0 on its padding
            out["position_ids"] = torch.arange(width).expand(batch, width) * out["attention_mask"]
        return out

    def _flatten(self, rows) -> dict[str, torch.Tensor]:
        # every example is at least one document: its own seq_lengths when packed, else its whole length
        seq_lengths = [length for ids, _, lengths in rows for length in (lengths or [ids.numel()])]
        input_ids = torch.cat([ids for ids, _, _ in rows])
        labels = torch.cat([row_labels for _, row_labels, _ in rows])
        _mask_starts(labels, seq_lengths)
        pad = _round_up(input_ids.numel(), self.pad_to_multiple_of) - input_ids.numel()
        if pad:
            input_ids = torch.cat([input_ids, torch.full((pad,), self.pad_token_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
            seq_lengths = seq_lengths + [pad]
        out = {"input_ids": input_ids[None], "position_ids": _positions(seq_lengths)[None], "labels": labels[None]}
        return {**out, **_varlen_boundaries(seq_lengths)}


def _varlen_boundaries(seq_lengths: Sequence[int]) -> dict[str, Any]:
    """The document boundaries of one flattened row, in the form transformers' varlen attention kernels take."""
    lengths = torch.as_tensor([n for n in seq_lengths if n > 0], dtype=torch.long)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(torch.int32)
    longest = int(lengths.max()) if lengths.numel() else 0
    seq_idx = torch.repeat_interleave(torch.arange(lengths.numel(), dtype=torch.int32), lengths)[None]
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "seq_idx": seq_idx}


def _pad_rows(rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _truncated(row: torch.Tensor, max_length: int | None, mode: str) -> torch.Tensor:
    if max_length is None or len(row) <= max_length:
        return row
    return row[:max_length] if mode == "keep_start" else row[-max_length:]


@dataclass
class DataCollatorForPreference:
    """Rows with `prompt_ids`, `chosen_ids`, `rejected_ids` (completion ids only; reward data may omit prompt_ids
    and give whole sequences) → a (2B, T) batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected,
    right-padded. Keys: `input_ids`, `attention_mask`, `completion_mask` (1 on completion tokens), TRL's keys only
    (posttrain's log-prob code reads the trained tokens from completion_mask: `models.logprobs.batch_labels`).
    Precomputed `ref_chosen_logps` / `ref_rejected_logps` and reward `margin` columns pass through as (B,).

    `max_length` cuts each row before padding (keep_start: its first tokens; keep_end: its last), as TRL's.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise UserError(f"truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}.")
        if self.return_tensors != "pt":
            raise UserError(f"Only return_tensors='pt' is supported, got {self.return_tensors!r}.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise UserError("Cannot collate an empty list of examples.")
        ids, labels = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt = _as_1d(ex.get("prompt_ids", []), "prompt_ids")
                completion = _as_1d(ex[key], key)
                ids.append(_truncated(torch.cat([prompt, completion]), self.max_length, self.truncation_mode))
                label = torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion])
                labels.append(_truncated(label, self.max_length, self.truncation_mode))
        length = _round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        batch = {"input_ids": _pad_rows(ids, self.pad_token_id, length),
                 "attention_mask": _pad_rows([torch.ones_like(r) for r in ids], 0, length),
                 "completion_mask": _pad_rows([(r != IGNORE_INDEX).long() for r in labels], 0, length)}
        for key in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch


@dataclass
class DataCollatorForUnpaired:
    """Unpaired preference rows (`prompt_ids`, `completion_ids`, `label`) → one right-padded batch for KTO.

    Rows 0..B-1 are prompt_i + completion_i. With `kl=True` (losses with a KL baseline), rows B..2B-1 are the
    mismatched pairs prompt_i + completion_{(i-s) mod B}: example i's prompt with the completion of the example s
    places before it in THIS batch, s = 1 unless that would pair some prompt with a completion written for it
    (see `mismatched_partners`). When examples carry `kl_completion_ids`, that fixed completion is used instead —
    the case of precomputed reference log-probs, whose pairs cannot change from batch to batch.
    `labels` hold the completion tokens (-100 elsewhere); `label` is (B,) bool; precomputed `ref_logps` /
    `ref_kl_logps` pass through as (B,).

    Why the pairs are built here and not in the dataset (as TRL does): TRL rotates completions within blocks of
    per_device_train_batch_size rows at preprocessing, which only lines up with the batches if the sampler is
    sequential. Rotating within the collated batch gives the same kind of pairs — the mismatched completions are
    exactly the batch's own completions, each with another example's prompt — whatever the sampler does, so
    shuffling stays on. z0 is the same estimator, and with a sequential sampler (and distinct neighbouring prompts)
    the pairs are TRL's exactly.

    KL rows are truncated to `max_length` (keeping the start): completion_{i-s} was only cut to fit its own prompt.
    A batch of one example has no other completion; its KL row pairs it with itself (as TRL's rotation does).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl: bool = True
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise UserError("Cannot collate an empty list of examples.")
        prompts = [_as_1d(ex["prompt_ids"], "prompt_ids") for ex in examples]
        completions = [_as_1d(ex["completion_ids"], "completion_ids") for ex in examples]
        pairs = list(zip(prompts, completions))
        if self.kl:
            if "kl_completion_ids" in examples[0]:
                others = [_as_1d(ex["kl_completion_ids"], "kl_completion_ids") for ex in examples]
            else:
                others = [completions[j] for j in mismatched_partners(prompts)]
            pairs += list(zip(prompts, others))
        ids, labels = [], []
        for prompt, completion in pairs:
            row = torch.cat([prompt, completion])
            label = torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion])
            if self.max_length is not None:
                row, label = row[: self.max_length], label[: self.max_length]
            ids.append(row)
            labels.append(label)
        length = _round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        batch = {"input_ids": _pad_rows(ids, self.pad_token_id, length),
                 "attention_mask": _pad_rows([torch.ones_like(r) for r in ids], 0, length),
                 "labels": _pad_rows(labels, IGNORE_INDEX, length),
                 "completion_mask": _pad_rows([(r != IGNORE_INDEX).long() for r in labels], 0, length),
                 "label": torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)}
        for key in ("ref_logps", "ref_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch


def mismatched_partners(prompts: Sequence[Any]) -> list[int]:
    """For each example i of a batch, the example j whose completion forms i's KL pair: j = (i − s) mod B for the
    smallest shift s ≥ 1 under which no example gets a completion of its own prompt; s = 1 when no shift works (one
    example, or one prompt). Always a rotation, so the batch's mismatched completions are its own completions.

    Why not always s = 1: unpaired preference pairs sit next to each other (prompt p's chosen, then its rejected),
    and s = 1 would pair every rejected row with its own prompt's chosen completion — a matched pair, biasing z0.

    Args: prompts, B token-id sequences (lists or 1-D tensors). Returns: B indices.
    """
    ids: dict[tuple[int, ...], int] = {}
    keys = [ids.setdefault(tuple(p.tolist() if torch.is_tensor(p) else p), len(ids)) for p in prompts]
    n = len(keys)
    for shift in range(1, n):
        if all(keys[i] != keys[(i - shift) % n] for i in range(n)):
            return [(i - shift) % n for i in range(n)]
    return [(i - 1) % n for i in range(n)]


@dataclass
class DataCollatorForUnpairedPreference:
    """TRL's unpaired-preference collator: rows with `prompt_ids`, `completion_ids`, `label` (and optionally a fixed
    mismatched `KL_completion_ids`) → `input_ids`, `attention_mask`, `completion_mask` (B, T) of prompt +
    completion, right-padded, `label` (B,) bool, and, when examples carry `KL_completion_ids`, the same three for
    prompt + KL completion as `KL_input_ids`, `KL_attention_mask`, `KL_completion_mask`. Precomputed `ref_logps` /
    `ref_KL_logps` pass through as (B,). TRL's keys only.

    KTOTrainer takes such batches as they are (`as_unpaired_rows`). Its default collator is
    `DataCollatorForUnpaired`, which builds the mismatched pairs from each batch instead (see there).
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise UserError("Cannot collate an empty list of examples.")
        out = self._rows(examples, "completion_ids", "")
        if "KL_completion_ids" in examples[0]:
            out.update(self._rows(examples, "KL_completion_ids", "KL_"))
        out["label"] = torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([float(ex[key]) for ex in examples])
        return out

    def _rows(self, examples, key: str, prefix: str) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for ex in examples:
            prompt, completion = _as_1d(ex["prompt_ids"], "prompt_ids"), _as_1d(ex[key], key)
            ids.append(_truncated(torch.cat([prompt, completion]), self.max_length, "keep_start"))
            labels.append(_truncated(torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion]), self.max_length,
                                     "keep_start"))
        length = _round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        out = {"input_ids": _pad_rows(ids, self.pad_token_id, length),
               "attention_mask": _pad_rows([torch.ones_like(r) for r in ids], 0, length),
               "completion_mask": _pad_rows([(r != IGNORE_INDEX).long() for r in labels], 0, length)}
        return {prefix + k: v for k, v in out.items()}


def as_unpaired_rows(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A `DataCollatorForUnpairedPreference` batch in `DataCollatorForUnpaired`'s layout: the KL rows (when given)
    appended below the real ones as rows B..2B-1, `labels` rebuilt from the completion masks, and `ref_KL_logps`
    renamed `ref_kl_logps`. Batches already in that layout are returned unchanged."""
    if "KL_input_ids" not in batch and "labels" in batch:
        return batch
    parts = [("input_ids", "attention_mask", "completion_mask")]
    if "KL_input_ids" in batch:
        parts.append(("KL_input_ids", "KL_attention_mask", "KL_completion_mask"))
    width = max(batch[ids].shape[1] for ids, _, _ in parts)

    def widen(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(batch[i], pad_token_id) for i, _, _ in parts])
    mask = torch.cat([widen(batch[m], 0) for _, m, _ in parts])
    completion = torch.cat([widen(batch[c], 0) for _, _, c in parts])
    out = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(completion == 0, IGNORE_INDEX),
           "label": batch["label"]}
    if "ref_logps" in batch:
        out["ref_logps"] = batch["ref_logps"]
    if "ref_KL_logps" in batch:
        out["ref_kl_logps"] = batch["ref_KL_logps"]
    return out
