"""Loading data sets by name: built-in sets (posttrain/arith-*), local files and directories, and Hub ids.

Everything goes through `datasets`; built-in sets are generated in memory (no hub access needed).
Not here: format detection and tokenisation.
"""

from __future__ import annotations

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


def load_mixture(specs: list[dict], split: str = "train") -> datasets.Dataset:
    """Concatenate several datasets: each spec is {path, name?, split?, data_files?, columns?}."""
    parts = []
    for spec in specs:
        unknown = set(spec) - {"path", "name", "split", "data_files", "columns"}
        if unknown or "path" not in spec:
            raise UserError(f"Each entry of `datasets` needs 'path' and may have name, split, data_files, columns; "
                            f"got {sorted(spec)}.")
        part = load_any_dataset(spec["path"], spec.get("name"), spec.get("split", split), spec.get("data_files"))
        if spec.get("columns"):
            part = part.select_columns(spec["columns"])
        parts.append(part)
    return datasets.concatenate_datasets(parts)


def load_train_eval(script_args, want_eval: bool) -> tuple[Any, Any]:
    """(train, eval-or-None) from `ScriptArguments`. Splits may be sliced: "train[:1000]"."""
    if script_args.datasets:
        return load_mixture(script_args.datasets, script_args.dataset_train_split), None
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
