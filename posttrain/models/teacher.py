"""The distillation teacher: building it, what it contributes to a rollout, and the divergence pass of the loss.

Lives here:
- `build_teacher`: the teacher from a model object, a name or path (`teacher_model_init_kwargs`), or the config's
  `teacher_model_name_or_path`; frozen and placed like a reference (`reference.prepare_frozen_model`); refused in one
  line when missing, when it is the student itself, or when its vocabulary differs from the student's.
- `teacher_columns`: the teacher's pass over a rollout, without gradients, run once per generation batch: per
  completion column either its final hidden states at the trained positions (exact loss: the head is applied later,
  chunk by chunk, so its (tokens × vocabulary) logits never exist as a whole) or its top-k log-probs and token ids
  (`teacher_top_k`).
- `divergence_terms`: the student's pass and the per-token JSD(β) (`losses/distill.py`) against those columns. The
  student's LM head runs on the trained positions only, a chunk of rows at a time (the teacher's head on the same
  chunk), keeping one float32 (tokens × V) gradient for the backward; when `chunked_lm_head` says so
  (`models/logprobs.py`; "auto" here: once that gradient would pass 256 MiB) each chunk runs under activation
  checkpointing instead and nothing of size tokens × V is kept (costs one more head matmul of each model per chunk).

A teacher is never part of the trained model: checkpoints hold the student only, and a resumed run loads the teacher
again from what was given.
Not here: the divergence maths (`losses/distill.py`), the rollout (`trainers/online.py`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.errors import UserError
from posttrain.losses.distill import jsd_with_entropy, teacher_top_k, top_k_generalized_jsd
from posttrain.models import loading, reference
from posttrain.models.logprobs import (
    CHUNK_ROWS,
    completion_labels,
    forward_target_rows,
    positions_from_mask,
    uses_chunked_head,
)
from posttrain.models.logprobs import _vocab_size as head_vocab_size


def build_teacher(trainer, teacher_model) -> torch.nn.Module:
    """The frozen teacher of `trainer` (after its base constructor): `teacher_model` (a model, a name or a path) or
    the config's teacher_model_name_or_path."""
    args, name = trainer.args, type(trainer).__name__
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise UserError(f"{name} needs a teacher: pass teacher_model=... (a model, Hub id or local path) or set "
                        "teacher_model_name_or_path (--teacher_model_name_or_path on the command line).")
    student = trainer.accelerator.unwrap_model(trainer.model)
    if teacher_model is student or teacher_model is getattr(student, "base_model", None):
        raise UserError(f"{name} got the student itself as teacher_model: training would move the teacher with it. "
                        "Load the teacher separately (or pass its name).")
    teacher_id = None
    if isinstance(teacher_model, str):
        teacher_id = teacher_model
        teacher_model = loading.load_pretrained_model(teacher_model, None, **args.teacher_init_kwargs())
    elif args.teacher_model_init_kwargs:
        raise UserError("teacher_model_init_kwargs applies to a teacher given by name, but teacher_model is already "
                        "loaded; drop teacher_model_init_kwargs or pass the teacher's name.")
    check_same_vocabulary(student, teacher_model, trainer.processing_class, teacher_id)
    return reference.prepare_frozen_model(trainer, teacher_model)


def _config_vocab_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_same_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, teacher_id: str | None):
    """Teacher and student must score the same tokens: equal vocabulary sizes and, for a teacher given by name, the
    same token → id map as the student's tokenizer. One-line UserError otherwise."""
    sizes = _config_vocab_size(student), _config_vocab_size(teacher)
    if None not in sizes and sizes[0] != sizes[1]:
        raise UserError(f"The teacher's vocabulary ({sizes[1]} tokens) differs from the student's ({sizes[0]}): "
                        "distillation compares next-token distributions, so both must share one tokenizer. Use a "
                        "teacher of the student's model family (same tokenizer).")
    if teacher_id is None or tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return
    try:
        teacher_tokenizer = loading.load_tokenizer(teacher_id)
    except (OSError, ValueError):  # a checkpoint without tokenizer files: the sizes above are all we can compare
        return
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"The teacher {teacher_id!r} has another tokenizer than the student (same size, different "
                        "tokens): distillation compares next-token distributions, so both must share one tokenizer.")


def _trained_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor], pack_rows: bool = True):
    """(rows (N, H) or logits (N, V), head or None) of the N trained completion tokens, row-major: the same order
    as `batch["completion_mask"].bool()` selects them."""
    labels, prompt_len = completion_labels(batch["input_ids"], batch["completion_mask"])
    hidden, head, logits, _, _, _ = forward_target_rows(model, batch["input_ids"], labels, batch["attention_mask"],
                                                        positions_from_mask(batch["attention_mask"]),
                                                        shared_prefix=prompt_len, pack_rows=pack_rows)
    return (hidden, head) if logits is None else (logits, None)


def _apply(head: torch.nn.Module | None, rows: torch.Tensor) -> torch.Tensor:
    return rows if head is None else head(rows)


@torch.no_grad()
def teacher_columns(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], rows_per_pass: int,
                    top_k: int | None = None, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The teacher's contribution to each trained completion token of `batch` (input_ids, attention_mask (B, P + C),
    completion_mask (B, C)), run `rows_per_pass` rows at a time:
    {"teacher_hidden": (B, C, H)} its final hidden states (or its logits (B, C, V) when its logits are not
    head(hidden)), or with `top_k` {"teacher_top_logps": (B, C, k) log-probs at `temperature`,
    "teacher_top_ids": (B, C, k)}; zeros on columns that are not trained."""
    mask = batch["completion_mask"].bool()
    B, C = mask.shape
    columns: dict[str, torch.Tensor] = {}
    for start in range(0, B, rows_per_pass):
        part = {k: batch[k][start:start + rows_per_pass] for k in ("input_ids", "attention_mask", "completion_mask")}
        part_mask = mask[start:start + rows_per_pass]
        if not part_mask.any():
            continue
        rows, head = _trained_rows(teacher, part)
        if top_k is None:
            values = {"teacher_hidden": rows}
        else:
            logps, ids = zip(*(teacher_top_k(_apply(head, rows[i:i + CHUNK_ROWS]), top_k, temperature)
                               for i in range(0, rows.shape[0], CHUNK_ROWS)))
            values = {"teacher_top_logps": torch.cat(logps), "teacher_top_ids": torch.cat(ids)}
        for key, value in values.items():
            if key not in columns:
                columns[key] = value.new_zeros(B, C, *value.shape[1:])
            columns[key][start:start + rows_per_pass][part_mask] = value
    if not columns:  # nothing trained in the whole batch: placeholders of the right kind
        keys = ("teacher_hidden",) if top_k is None else ("teacher_top_logps", "teacher_top_ids")
        columns = {key: mask.new_zeros(B, C, 1, dtype=torch.long if key.endswith("ids") else torch.float32)
                   for key in keys}
    return columns


# Unchunked, the divergence keeps one float32 (tokens, V) tensor for its backward (its closed-form gradient,
# `losses/distill.py`) and makes its temporaries a chunk at a time; "auto" (`chunked_lm_head`) checkpoints the chunks
# — keeping nothing, recomputing both heads in the backward — once that tensor would pass DIVERGENCE_KEEP_BYTES.
# A chunk's temporaries: about DIVERGENCE_FLOATS (rows, V) float32 tensors, within DIVERGENCE_CHUNK_BYTES.
DIVERGENCE_FLOATS = 6
DIVERGENCE_CHUNK_BYTES = 64 << 20
DIVERGENCE_KEEP_BYTES = 256 << 20


def divergence_chunk_rows(vocab: int) -> int:
    """Rows per chunk of the divergence: DIVERGENCE_FLOATS (rows, V) float32 tensors within DIVERGENCE_CHUNK_BYTES
    (87 rows at V = 32k, 56 at 49k), at least 16."""
    return max(16, DIVERGENCE_CHUNK_BYTES // (vocab * 4 * DIVERGENCE_FLOATS))


def _chunk_divergence(student_rows, student_head, teacher_rows, teacher_head, teacher_ids, beta: float,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: per-token JSD(β) (differentiable in the student) and the student's entropy (detached)."""
    student_logits = _apply(student_head, student_rows)
    if teacher_ids is not None:
        with torch.no_grad():
            logp = torch.log_softmax(student_logits.detach().float() / temperature, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
        return top_k_generalized_jsd(student_logits, teacher_rows, teacher_ids, beta, temperature), entropy
    with torch.no_grad():
        teacher_logits = _apply(teacher_head, teacher_rows)
    return jsd_with_entropy(student_logits, teacher_logits, beta, temperature)


def divergence_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], teacher_head: torch.nn.Module | None,
                     beta: float, temperature: float, chunked_lm_head=None,
                     pack_rows: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token JSD(β) between the student `model` and the teacher columns of `batch` (from `teacher_columns`),
    over the trained completion tokens: (terms (N,) in row-major order of completion_mask, {"entropy": mean
    student entropy}). `teacher_head`: the teacher's LM head for "teacher_hidden" columns (None when they hold
    logits). `chunked_lm_head` as in `models/logprobs.py` (None: the trainer's setting)."""
    mask = batch["completion_mask"].bool()
    student_rows, student_head = _trained_rows(model, batch, pack_rows)
    top_k = "teacher_top_ids" in batch
    teacher_rows = batch["teacher_top_logps"][mask] if top_k else batch["teacher_hidden"][mask]
    teacher_ids = batch["teacher_top_ids"][mask] if top_k else None
    head = None if top_k else teacher_head
    n = student_rows.shape[0]
    if teacher_rows.shape[0] != n:  # the student's trained positions are the completion mask's: a bug otherwise
        raise RuntimeError(f"{n} student rows but {teacher_rows.shape[0]} teacher rows")
    if n == 0:  # nothing trained here: a zero loss that still reaches the graph
        return student_rows.sum(-1)[:0], {"entropy": student_rows.new_zeros(())}
    vocab = head_vocab_size(student_head) if student_head is not None else None
    rows = divergence_chunk_rows(vocab) if vocab else n
    checkpointed = student_head is not None and uses_chunked_head(chunked_lm_head, n, student_head,
                                                                  DIVERGENCE_KEEP_BYTES)
    parts = []
    for s in range(0, n, rows):
        chunk = (student_rows[s:s + rows], student_head, teacher_rows[s:s + rows], head,
                 None if teacher_ids is None else teacher_ids[s:s + rows], beta, temperature)
        parts.append(checkpoint(_chunk_divergence, *chunk, use_reentrant=False) if checkpointed
                     else _chunk_divergence(*chunk))
    terms, entropy = (torch.cat(column) for column in zip(*parts))
    return terms, {"entropy": entropy.sum() / max(n, 1)}
