"""Loading data sets by name: built-in sets (posttrain/arith-*), local files and directories, and Hub ids.

Everything goes through `datasets`; built-in sets are generated in memory (no hub access needed).
Not here: format detection and tokenisation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import datasets

from posttrain.errors import UserError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                  ".arrow": "arrow"}


def load_any_dataset(name: str, config: str | None = None, split: str | None = None,
                     data_files: Any = None, streaming: bool = False):
    """A Dataset (when `split` is given) or DatasetDict from a built-in name, a local file/dir, or a Hub id."""
    from posttrain.data.arith import is_builtin_dataset, load_builtin_dataset

    if is_builtin_dataset(name) or name.startswith("posttrain/"):
        return load_builtin_dataset(name, config, split)
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and ext in _FILE_BUILDERS and ext != ".parquet" and not _has_content(name):
        raise UserError(f"Dataset file {name!r} holds no examples (it is empty or only blank lines); add rows, or "
                        "choose another --dataset_name.")
    if os.path.isfile(name) and ext in _FILE_BUILDERS:
        return _load_local(name, _FILE_BUILDERS[ext], data_files=name, split=split or "train", streaming=streaming)
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(
                os.path.join(name, "dataset_info.json")):
            loaded = datasets.load_from_disk(name)
            return loaded[split] if split and isinstance(loaded, datasets.DatasetDict) else loaded
        kinds = sorted({os.path.splitext(f)[1].lower() for f in os.listdir(name)} & set(_FILE_BUILDERS))
        if data_files is None and len({_FILE_BUILDERS[k] for k in kinds}) > 1:
            raise UserError(f"Dataset folder {name!r} holds files of several formats ({', '.join(kinds)}); only one "
                            "would be read. Keep one format in the folder, or give the file itself.")
        return _load_local(name, name, config, split=split, data_files=data_files, streaming=streaming)
    if name.startswith((".", "/")) or ext in _FILE_BUILDERS:
        raise UserError(f"Dataset path {name!r} does not exist. Give an existing .json/.jsonl/.csv/.parquet file, "
                        "a directory, a Hub id, or a built-in set such as posttrain/arith-sft.")
    return datasets.load_dataset(name, config, split=split, data_files=data_files, streaming=streaming)


def _has_content(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _load_local(name: str, *args: Any, **kwargs: Any):
    """`datasets.load_dataset` on a local file or directory; a file that does not parse becomes one clear line."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"Could not read dataset {name!r}: {detail}. Fix the data file(s) (JSON Lines: one JSON "
                        "object per line; CSV: a header row, then one row per example) or choose another "
                        "--dataset_name.") from e


def load_mixture(mixture, split: str = "train", streaming: bool = False):
    """The rows of several datasets concatenated. `mixture`: a `DatasetMixtureConfig`, or a YAML `datasets:` list
    (mappings {path, name?, data_dir?, data_files?, split?, columns?, fraction?}; `split`, `streaming` fill in what
    the entries leave unset) — returns the train Dataset then. A `DatasetMixtureConfig` gives a DatasetDict: "train",
    plus "test" when its test_split_size is set. With `fraction`s (all or none), the shares are normalised to w_i
    and the mixture is the largest N with round(w_i·N) ≤ len_i for every dataset; each contributes its first
    round(w_i·N) rows. TRL's `get_dataset` is this on a DatasetMixtureConfig."""
    from posttrain.configs.script import DatasetMixtureConfig

    if not isinstance(mixture, DatasetMixtureConfig):
        return load_mixture(mixture_config(mixture, split, streaming=streaming))["train"]
    if not mixture.datasets:
        raise UserError("The dataset mixture is empty: give `datasets:` a list of {path: ...} entries.")
    parts = []
    for spec in mixture.datasets:
        if spec.data_dir is not None:
            part = datasets.load_dataset(spec.path, spec.name, data_dir=spec.data_dir, data_files=spec.data_files,
                                         split=spec.split, streaming=mixture.streaming)
        else:
            part = load_any_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files,
                                    streaming=mixture.streaming)
        parts.append(part.select_columns(spec.columns) if spec.columns else part)
    fractions = [spec.fraction for spec in mixture.datasets]
    if any(f is not None for f in fractions):
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 for f in fractions) \
                or not sum(fractions) > 0:  # None, text, True, a negative share, or nothing to mix
            raise UserError(f"Set a `fraction` >= 0 for every dataset of the mixture (not all 0), or for none; got "
                            f"{fractions}.")
        if mixture.streaming:
            raise UserError("`fraction` needs the datasets' lengths, so it cannot be used with streaming; drop one "
                            "of them.")
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(part) / w for part, w in zip(parts, weights) if w > 0)  # a 0 share contributes no rows
        parts = [part.select(range(min(len(part), round(w * total)))) for part, w in zip(parts, weights)]
    combined = parts[0] if len(parts) == 1 else _concatenate(parts, [spec.path for spec in mixture.datasets])
    if mixture.test_split_size is not None:
        if mixture.streaming:
            raise UserError("test_split_size cannot split a streamed mixture; drop one of them.")
        return combined.train_test_split(test_size=mixture.test_split_size)
    return (datasets.IterableDatasetDict if mixture.streaming else datasets.DatasetDict)({"train": combined})


def mixture_config(entries: list, split: str = "train", **options: Any):
    """A DatasetMixtureConfig from a YAML `datasets:` list; entries without a `split` take `split` (the command
    line's dataset_train_split). `options`: streaming, test_split_size. Malformed entries are one-line errors."""
    from posttrain.configs.script import DatasetMixtureConfig

    if not isinstance(entries, list):
        raise UserError(f"`datasets` must be a list of {{path: ...}} entries, got {entries!r}.")
    return DatasetMixtureConfig(datasets=[{"split": split, **e} if isinstance(e, dict) else e for e in entries],
                                **options)


def _concatenate(parts: list, names: list[str]):
    """datasets.concatenate_datasets (a column missing from some parts is filled with None there), with parts that
    cannot share one table (standard text beside conversational messages, other types) named in one line instead of
    Arrow's schema dump."""
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        def shape(features):
            return ", ".join(f"{k}: {getattr(v, 'dtype', None) or type(v).__name__}" for k, v in features.items())

        described = "; ".join(f"{name!r} has ({shape(part.features)})" for name, part in zip(names, parts)
                              if part.features is not None)
        raise UserError(f"The datasets of the mixture cannot be combined ({described}): a column must have one type "
                        "in all of them. Keep the columns they share with `columns:` and one format (standard or "
                        "conversational) for all.") from e


def load_train_eval(script_args, want_eval: bool) -> tuple[Any, Any]:
    """(train, eval-or-None) from `ScriptArguments`. Splits may be sliced: "train[:1000]"."""
    if script_args.datasets:
        return _mixture_train_eval(script_args, want_eval)
    if not script_args.dataset_name:
        raise UserError("No data: pass --dataset_name (e.g. posttrain/arith-sft, a local .jsonl file or a Hub id).")
    name, config = script_args.dataset_name, script_args.dataset_config
    streaming = script_args.dataset_streaming
    try:
        train = load_any_dataset(name, config, split=script_args.dataset_train_split, streaming=streaming)
    except (KeyError, ValueError) as e:
        if "split" not in str(e).lower() or name.startswith("posttrain/"):
            raise
        raise UserError(f"Split {script_args.dataset_train_split!r} not found in {name!r} ({e}). Choose one "
                        "with --dataset_train_split.") from None
    evaluation = None
    if want_eval:
        try:
            evaluation = load_any_dataset(name, config, split=script_args.dataset_test_split, streaming=streaming)
        except (KeyError, ValueError):
            raise UserError(f"Evaluation is on but split {script_args.dataset_test_split!r} was not found in "
                            f"{name!r}; set --dataset_test_split or --eval_strategy no.") from None
    return train, evaluation


def _mixture_train_eval(script_args, want_eval: bool) -> tuple[Any, Any]:
    """(train, eval-or-None) from a `datasets:` mixture: a list of entries, or a DatasetMixtureConfig (the command
    line's, with the YAML's test_split_size). The one-dataset options would be ignored beside it, so they are refused."""
    from posttrain.configs.script import DatasetMixtureConfig

    for option in ("dataset_name", "dataset_config"):
        if getattr(script_args, option, None):
            raise UserError(f"Both a `datasets:` mixture and {option} ({getattr(script_args, option)!r}) are set; "
                            f"the mixture would replace it. Keep one (a mixture entry takes path and name).")
    if getattr(script_args, "dataset_test_split", "test") != "test":
        raise UserError(f"dataset_test_split ({script_args.dataset_test_split!r}) does not apply to a `datasets:` "
                        "mixture: its evaluation rows are cut from the mixture by test_split_size.")
    mixture = script_args.datasets
    if not isinstance(mixture, DatasetMixtureConfig):
        mixture = mixture_config(mixture, script_args.dataset_train_split)
    splits = load_mixture(dataclasses.replace(mixture, streaming=mixture.streaming or script_args.dataset_streaming))
    if want_eval and "test" not in splits:
        raise UserError("Evaluation is on but the `datasets:` mixture has no evaluation split; add test_split_size "
                        "(e.g. 0.05) to the YAML, or set --eval_strategy no.")
    return splits["train"], splits["test"] if want_eval else None
