"""Dataset preparation pipelines, one per trainer family: raw rows in, tokenised rows with loss masks out.

SFT: ShareGPT → messages; optional formatting_func; type detection (language modelling or prompt-completion,
standard or conversational); tokenisation with masks; truncation to max_length; examples left with no trainable
token dropped (and counted); optional packing.

Preference (DPO, reward, ORPO, CPO): implicit prompts extracted; prompt and completion ids kept apart
(`prompt_ids`, `chosen_ids`, `rejected_ids`) so trainers can share the prompt; prompts longer than
max_prompt_length keep their last tokens, completions are cut so prompt + completion fits max_length, and pairs
whose prompt alone fills max_length are dropped and counted.

Unpaired (KTO): (prompt, completion, label) rows, paired preference data unpaired first; the same truncation
rules; the mismatched pairs of the KL baseline are left to the collator.

Not here: per-example tokenisation (`data/tokenize.py`), packing algorithms (`data/packing.py`), batching
(`data/collators.py`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import datasets

from posttrain.data import formats, tokenize
from posttrain.data.collators import IGNORE_INDEX
from posttrain.errors import UserError

logger = logging.getLogger(__name__)
SFT_TYPES = ("language_modeling", "prompt_completion")


def _first_row(dataset) -> dict[str, Any]:
    return next(iter(dataset))


def _is_pretokenized(dataset) -> bool:
    return "input_ids" in (dataset.column_names or [])


MASK_COLUMNS = ("completion_mask", "assistant_masks")  # pre-tokenised rows may mark trained tokens with these


def prepare_sft_dataset(dataset, tokenizer, args, formatting_func: Callable | None = None,
                        packing: bool | None = None, name: str = "train"):
    """Tokenise an SFT dataset into TRL 1.16's rows: `input_ids` and `labels` (the token where it is trained, -100
    elsewhere); packed rows also carry `seq_lengths`.

    Pre-tokenised rows (`input_ids`) keep a `labels` column as it is; else `labels` are built from a
    `completion_mask` or `assistant_masks` column (1 = trained), else every token is trained.
    """
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return _check_unprepared(dataset, name)
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise UserError(f"The {name} dataset is empty; give at least one example.")
    if isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom":
        raise UserError(f"The {name} dataset uses Dataset.with_transform(), which preparation would read through "
                        "once and bake into the rows (a random transform would be frozen): pass dataset_kwargs="
                        "{'skip_prepare_dataset': True} and make the transform return trainer-ready rows (input_ids, "
                        "and labels with -100 on untrained tokens), or apply a fixed transform with dataset.map() "
                        "first.")
    if _is_pretokenized(dataset):
        dataset = _labelled(dataset)
    else:
        dataset = _tokenize_sft(dataset, tokenizer, args, formatting_func, name)
        dataset = dataset.map(_labels_from_mask, remove_columns=["completion_mask"])
    # rows with nothing to train on before any truncation: no assistant turn (assistant_only_loss), empty completions
    why = ("no assistant turn to train on (assistant_only_loss=True)" if args.assistant_only_loss
           else "no token to train on")
    dataset = _drop_untrained(dataset, name, why, "Give every row an assistant turn, or set assistant_only_loss="
                              "False." if args.assistant_only_loss else "Remove rows with empty completions.")
    if args.max_length is not None and not (packing and args.packing_strategy != "bfd"):
        dataset = dataset.map(tokenize.truncate, fn_kwargs={"max_length": args.max_length, "keys": SFT_COLUMNS,
                                                          "mode": args.truncation_mode},
                              **_desc(dataset, f"Truncating {name} dataset", args.dataset_num_proc))
    dataset = _drop_untrained(dataset, name, f"no trainable token left after truncation to max_length="
                              f"{args.max_length}", "Raise max_length or shorten the prompts.")
    shuffle = getattr(args, "shuffle_dataset", False)
    if packing:
        from posttrain.data.packing import pack_dataset

        if shuffle:  # before packing too: neighbours in the source would otherwise share packed rows
            dataset = shuffled(dataset, args.seed)
        dataset = pack_dataset(dataset, args.max_length, strategy=args.packing_strategy, columns=SFT_COLUMNS)
    return shuffled(dataset, args.seed) if shuffle else dataset


SFT_COLUMNS = ("input_ids", "labels")


def _labels_from_mask(example: dict[str, Any], mask_column: str = "completion_mask") -> dict[str, list[int]]:
    return {"labels": [t if m else IGNORE_INDEX for t, m in zip(example["input_ids"], example[mask_column])]}


def _labelled(dataset):
    """Pre-tokenised rows with a `labels` column: given labels kept, else built from a mask column, else every
    token; the mask columns removed."""
    names = list(dataset.column_names or _first_row(dataset).keys())
    masks = [c for c in MASK_COLUMNS if c in names]
    if "labels" not in names:
        if masks:
            dataset = dataset.map(_labels_from_mask, fn_kwargs={"mask_column": masks[0]})
        else:
            dataset = dataset.map(lambda ex: {"labels": list(ex["input_ids"])})
    return dataset.remove_columns(masks) if masks else dataset


def _check_unprepared(dataset, name: str):
    """skip_prepare_dataset: rows go to the collator as they are, which reads `labels` or `completion_mask` but no
    other mask column; one carrying only such a mask would silently train on every token."""
    names = list(dataset.column_names or [])
    if "assistant_masks" in names and not {"labels", "completion_mask"} & set(names):
        raise UserError(f"The {name} dataset has an 'assistant_masks' column but no 'labels', and "
                        "skip_prepare_dataset=True skips building them, so every token would be trained. Add a "
                        "'labels' column (-100 on untrained tokens), or drop skip_prepare_dataset.")
    return dataset


def shuffled(dataset, seed: int):
    """The dataset in a seeded random order (a streamed one through datasets' shuffle buffer)."""
    if isinstance(dataset, datasets.Dataset):
        return dataset.shuffle(seed=seed).flatten_indices()  # later maps then read rows in order
    return dataset.shuffle(seed=seed)


def _drop_untrained(dataset, name: str, why: str, fix: str):
    """Drop rows without a trained token, with one warning saying why (an error when none is left)."""
    return filter_counted(dataset, lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]), name, why, fix)


def _tokenize_sft(dataset, tokenizer, args, formatting_func, name):
    first = _first_row(dataset)
    if formats.is_sharegpt(first):
        dataset = dataset.map(formats.sharegpt_to_messages, remove_columns=["conversations"])
        first = _first_row(dataset)
    if formatting_func is not None:
        # the formatted text is the whole example: other columns (prompt, messages, labels…) must not change
        # what the row is detected as
        dataset = dataset.map(lambda ex: {"text": _formatted(formatting_func, ex)},
                              remove_columns=[c for c in dataset.column_names or first.keys() if c != "text"])
        text_field = "text"
        first = _first_row(dataset)
    else:
        text_field = args.dataset_text_field
    columns = list(dataset.column_names or first.keys())
    kind = formats.require_type(columns, SFT_TYPES, "SFTTrainer", text_field)
    conversational = formats.is_conversational(_first_row(dataset))
    completion_only = args.completion_only_loss is not False  # None = auto: on for prompt-completion
    if args.completion_only_loss is True and kind != "prompt_completion":
        raise UserError(f"completion_only_loss=True needs prompt-completion data (columns 'prompt' and "
                        f"'completion'); this {name} dataset is {kind.replace('_', ' ')} data, with no completion to "
                        "restrict the loss to. Drop the option (or use assistant_only_loss for messages).")
    if args.assistant_only_loss and not conversational:
        raise UserError("assistant_only_loss=True needs conversational data (a 'messages' column or "
                        "conversational prompt/completion).")
    eos = tokenizer.eos_token

    def one(example):
        _check_row(example, kind, text_field)
        if kind == "prompt_completion":
            return tokenize.tokenize_prompt_completion(tokenizer, example["prompt"], example["completion"], eos,
                                                       completion_only, **_template_options(example))
        if conversational or "messages" in example and text_field not in example:
            return tokenize.tokenize_messages(tokenizer, example["messages"], args.assistant_only_loss,
                                              **_template_options(example))
        return tokenize.tokenize_text(tokenizer, example[text_field], eos)

    return dataset.map(one, remove_columns=columns, **_desc(dataset, f"Tokenizing {name} dataset",
                                                            args.dataset_num_proc))


def _template_options(example: dict[str, Any]) -> dict[str, Any]:
    """A row's own chat-template options: its `tools` and `chat_template_kwargs` columns (None when absent)."""
    kwargs = example.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UserError(f"Column 'chat_template_kwargs' must hold mappings (e.g. {{'enable_thinking': False}}), got "
                        f"{type(kwargs).__name__} ({kwargs!r:.80}).")
    # Arrow stores a column of mappings as one struct type: keys some rows lack come back as None
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None} or None
    return {"tools": example.get("tools"), "chat_template_kwargs": kwargs}


def _formatted(formatting_func, example):
    text = formatting_func(example)
    if isinstance(text, list):  # older formatting functions return a one-element list
        text = text[0] if len(text) == 1 else "".join(text)
    return text


def _check_row(example: dict[str, Any], kind: str, text_field: str) -> None:
    keys = ("prompt", "completion") if kind == "prompt_completion" else (
        ("messages",) if "messages" in example and text_field not in example else (text_field,))
    _check_fields(example, keys)


def _check_fields(example: dict[str, Any], keys: tuple[str, ...], may_be_empty: tuple[str, ...] = ()) -> None:
    """Each of `keys` a string or a list of messages, non-empty unless in `may_be_empty`; else a ValueError."""
    for key in keys:
        value = example.get(key)
        if value is None or (key not in may_be_empty and isinstance(value, (str, list)) and len(value) == 0):
            raise UserError(f"A row has an empty or missing '{key}' ({example!r:.200}). Remove such rows, e.g. "
                            f"dataset.filter(lambda ex: ex['{key}']).")
        if not isinstance(value, (str, list)):
            raise UserError(f"Column '{key}' must hold strings or lists of messages, got "
                            f"{type(value).__name__} ({value!r:.80}). Convert it, e.g. "
                            f"dataset.map(lambda ex: {{'{key}': str(ex['{key}'])}}).")
        if isinstance(value, list):
            _check_messages(key, value)


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")


def _check_messages(key: str, messages: list) -> None:
    """Every entry of a conversational column is a {role, content} message with a known role and text (or content
    blocks) as content; else one line naming the column and the message (not a chat template's jinja2 error)."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"Column '{key}' holds a list whose entry {i} is a {type(message).__name__} "
                            f"({message!r:.60}), not a {{'role', 'content'}} message; give a string, or a list of "
                            "messages.")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"Column '{key}': message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)} "
                            "(ShareGPT's human/gpt are converted only in a 'conversations' column).")
        if content is None and not message.get("tool_calls"):
            raise UserError(f"Column '{key}': message {i} ({role}) has no content (null or missing); give it "
                            "text, or drop the message.")


def check_prompts(dataset, tokenizer, name: str = "train") -> None:
    """Prompt-only data (online trainers): every `prompt` a non-empty string or message list, and a chat template
    for message lists. Checked on the Arrow column at once (no pass in Python); streamed datasets are skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(dataset, datasets.Dataset) or "prompt" not in dataset.column_names or len(dataset) == 0:
        return
    column = dataset.with_format("arrow")["prompt"]
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lengths = pc.utf8_length(column)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(column)
    elif not pa.types.is_null(kind):
        raise UserError(f"Column 'prompt' of the {name} dataset must hold strings or lists of messages, got {kind} "
                        f"values (first: {column[0].as_py()!r:.80}). Convert it, e.g. "
                        "dataset.map(lambda ex: {'prompt': str(ex['prompt'])}).")
    else:
        lengths = column  # all null
    bad = int(pc.index(pc.fill_null(pc.equal(lengths, 0), True), True).as_py())
    if bad >= 0:
        raise UserError(f"Row {bad} of the {name} dataset has an empty or missing 'prompt' "
                        f"({dataset[bad]!r:.200}). Remove such rows, e.g. dataset.filter(lambda ex: ex['prompt']).")
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        tokenize.require_chat_template(tokenizer)  # now, rather than at the first rollout


PREFERENCE_TYPES = ("preference", "preference_implicit")


def _drop_report(before: int, after: int, name: str, why: str, fix: str) -> None:
    if after < before:
        logger.warning("%s dataset: dropped %d of %d examples (%s).", name, before - after, before, why)
    if after == 0:
        raise UserError(f"Every {name} example was dropped ({why}). {fix}")


def _has_limits(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("max_prompt_length", "max_length",
                                                              "max_completion_length"))


def _limits(args) -> dict[str, int | None]:
    """The truncation limits as plain values (so dataset fingerprints, and caches keyed by them, depend only on
    these, not on unrelated options such as output_dir)."""
    return {k: getattr(args, k, None) for k in ("max_prompt_length", "max_length", "max_completion_length")}


def _truncate_pair_row(example, keys: tuple[str, ...], max_prompt_length: int | None, max_length: int | None,
                       max_completion_length: int | None) -> dict[str, list[int]]:
    """Prompt keeps its last max_prompt_length tokens (the question and the generation prompt); each completion
    keeps its first max_completion_length tokens and is cut so prompt + completion fits max_length."""
    prompt = example["prompt_ids"]
    max_prompt, max_completion = max_prompt_length, max_completion_length
    if max_prompt is not None and len(prompt) > max_prompt:
        prompt = prompt[-max_prompt:]
    out = {"prompt_ids": prompt}
    for key in keys:
        ids = example[key][:max_completion] if max_completion else example[key]
        out[key] = ids[: max(max_length - len(prompt), 0)] if max_length else ids
    return out


def _typed_rows(dataset, name: str, accepted: tuple[str, ...], who: str):
    """Shared start of the pair pipelines: reject an empty set, pass through already-tokenised rows (None), check
    the columns, and make implicit prompts explicit. Returns (dataset, detected type, original columns)."""
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise UserError(f"The {name} dataset is empty; give at least one example.")
    if "prompt_ids" in (dataset.column_names or []):
        return None
    columns = list(dataset.column_names or _first_row(dataset).keys())
    kind = formats.require_type(columns, accepted, who)
    if kind == "preference_implicit":
        dataset = dataset.map(formats.extract_prompt, **_desc(dataset, f"Extracting prompts ({name})"))
    return dataset, kind, columns


def prepare_preference_dataset(dataset, tokenizer, args, name: str = "train", who: str = "DPOTrainer",
                               joint: bool = False):
    """Tokenise (prompt, chosen, rejected) rows into prompt_ids / chosen_ids / rejected_ids (joint: prompt + each
    completion tokenised as one text, prompt_ids empty — for reward models).

    Already-tokenised pairs pass through: prompt_ids + chosen_ids + rejected_ids; for reward models also whole
    sequences without prompt_ids, under TRL's names (chosen_ids / rejected_ids, the deprecated chosen_input_ids /
    rejected_input_ids, and the older input_ids_chosen / input_ids_rejected)."""
    dataset = _pretokenized_pairs(dataset, joint, who)
    prepared = _typed_rows(dataset, name, PREFERENCE_TYPES, who)
    if prepared is None:
        return dataset
    dataset, kind, columns = prepared
    eos = tokenizer.eos_token
    extra = [c for c in ("margin", "ref_chosen_logps", "ref_rejected_logps") if c in columns]

    def one(example):
        _check_fields(example, ("prompt", "chosen", "rejected"), may_be_empty=("prompt",))
        prompt_ids, (chosen_ids, rejected_ids) = tokenize.tokenize_prompt_and_completions(
            tokenizer, example["prompt"], [example["chosen"], example["rejected"]], eos, joint=joint,
            **_template_options(example))
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}

    remove = [c for c in dataset.column_names or columns if c not in extra]
    dataset = dataset.map(one, remove_columns=remove, **_desc(dataset, f"Tokenizing {name} dataset",
                                                              args.dataset_num_proc))
    if _has_limits(args):
        dataset = dataset.map(_truncate_pair_row, fn_kwargs={"keys": ("chosen_ids", "rejected_ids"), **_limits(args)},
                              **_desc(dataset, None, args.dataset_num_proc))
    return filter_counted(dataset, lambda ex: len(ex["chosen_ids"]) > 0 and len(ex["rejected_ids"]) > 0, name,
                          f"prompt fills max_length={args.max_length}",
                          "Raise max_length or set max_prompt_length below it.", args.dataset_num_proc)


def filter_counted(dataset, keep, name: str, why: str, fix: str, num_proc: int | None = None):
    """`dataset.filter(keep)`, with one warning counting the dropped rows (an error when none is left) for a
    map-style dataset; a streamed one is filtered lazily as it is read."""
    if not isinstance(dataset, datasets.Dataset):
        return dataset.filter(keep)
    before = len(dataset)
    dataset = dataset.filter(keep, num_proc=num_proc)
    _drop_report(before, len(dataset), name, why, fix)
    return dataset


_TOKENIZED_PAIR_NAMES = (("chosen_input_ids", "rejected_input_ids"), ("input_ids_chosen", "input_ids_rejected"))


def _pretokenized_pairs(dataset, joint: bool, who: str):
    """Tokenised whole pairs under TRL's older column names renamed to chosen_ids / rejected_ids, with empty
    prompt_ids added (reward models score whole sequences); other datasets unchanged."""
    names = list(dataset.column_names or _first_row(dataset).keys())
    if "chosen_ids" not in names:
        for chosen, rejected in _TOKENIZED_PAIR_NAMES:
            if chosen in names and rejected in names:
                warnings.warn(f"Columns {chosen!r} / {rejected!r} are older names (deprecated in TRL, and will not be "
                              "supported in v1); rename them 'chosen_ids' / 'rejected_ids'.", FutureWarning,
                              stacklevel=2)
                dataset = dataset.rename_columns({chosen: "chosen_ids", rejected: "rejected_ids"})
                names = [{chosen: "chosen_ids", rejected: "rejected_ids"}.get(c, c) for c in names]
                break
    if "chosen_ids" in names and "rejected_ids" in names and "prompt_ids" not in names:
        if not joint:
            raise UserError(f"{who} got tokenised chosen_ids / rejected_ids without prompt_ids: give prompt_ids too "
                            "(the completion columns hold the completion tokens only), or give text columns.")
        dataset = dataset.map(lambda ex: {"prompt_ids": []})
    return dataset


UNPAIRED_TYPES = ("unpaired_preference", "preference", "preference_implicit")


def prepare_unpaired_dataset(dataset, tokenizer, args, name: str = "train", who: str = "KTOTrainer"):
    """Tokenise unpaired (prompt, completion, label) rows into prompt_ids / completion_ids / label (KTO).

    Paired preference rows (explicit or implicit prompt) are unpaired first: each pair gives one desirable row
    (its chosen completion) and one undesirable row (its rejected one). Truncation follows the preference
    pipeline: prompts longer than max_prompt_length keep their last tokens, completions are cut to
    max_completion_length and then to what max_length leaves after the prompt, and rows left with no completion
    token are dropped and counted. Precomputed `ref_logps` / `ref_kl_logps` columns are kept.

    The mismatched (prompt, other completion) pairs of the KL baseline are NOT built here: the collator
    (`DataCollatorForUnpaired`) builds them from each batch, so the sampler may shuffle.
    """
    prepared = _typed_rows(dataset, name, UNPAIRED_TYPES, who)
    if prepared is None:
        return dataset
    dataset, kind, columns = prepared
    if kind != "unpaired_preference":
        pairs = len(dataset) if isinstance(dataset, datasets.Dataset) else None
        dataset = dataset.map(formats.unpair_preference, batched=True, remove_columns=dataset.column_names or columns,
                              **_desc(dataset, f"Unpairing {name} dataset"))
        logger.info("%s dataset: %s preference pairs unpaired into one desirable (chosen) and one undesirable "
                    "(rejected) example each.", name, pairs if pairs is not None else "streamed")
        columns = ["prompt", "completion", "label", *[c for c in columns if c not in ("prompt", "chosen", "rejected")]]
    eos = tokenizer.eos_token
    extra = [c for c in ("ref_logps", "ref_kl_logps") if c in columns]

    def one(example):
        _check_fields(example, ("prompt", "completion"), may_be_empty=("prompt",))
        if not isinstance(example.get("label"), bool) and example.get("label") not in (0, 1):
            raise UserError(f"Column 'label' must hold booleans (True = desirable, False = undesirable), got "
                            f"{example.get('label')!r:.80}. Convert it, e.g. dataset.map(lambda ex: "
                            "{'label': ex['label'] == 'good'}).")
        prompt_ids, (completion_ids,) = tokenize.tokenize_prompt_and_completions(
            tokenizer, example["prompt"], [example["completion"]], eos, **_template_options(example))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": bool(example["label"])}

    remove = [c for c in dataset.column_names or columns if c not in extra]
    dataset = dataset.map(one, remove_columns=remove, **_desc(dataset, f"Tokenizing {name} dataset",
                                                                args.dataset_num_proc))
    max_length = getattr(args, "max_length", None)
    if _has_limits(args):
        dataset = dataset.map(_truncate_pair_row, fn_kwargs={"keys": ("completion_ids",), **_limits(args)},
                              **_desc(dataset, None, args.dataset_num_proc))
    return filter_counted(dataset, lambda ex: len(ex["completion_ids"]) > 0, name,
                          f"prompt fills max_length={max_length}", "Raise max_length or set max_prompt_length below it.",
                          args.dataset_num_proc)


def _desc(dataset, text: str | None, num_proc: int | None = None) -> dict[str, Any]:
    """map() keyword arguments: a progress description and processes, which only map-style datasets accept."""
    if not isinstance(dataset, datasets.Dataset):
        return {}
    return {"desc": text, "num_proc": num_proc}
