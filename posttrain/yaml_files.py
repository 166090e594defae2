"""Reading the YAML files users write (run configs for `--config`, pipeline files): one mapping, or a one-line
error that says where the file is wrong.

Not here: what the keys mean (`cli.py` for run configs, `pipeline/spec.py` for pipelines).
"""

from __future__ import annotations

import os
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error (the plain loader keeps the
    last value without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_mapping(path: str, kind: str, expected: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping at the top of the YAML file `path`; `error(one line)` when the file is missing (named as
    `kind`, e.g. "config file"), is not YAML (with the line and column), or does not hold `expected`."""
    if not os.path.isfile(path):
        raise error(f"{kind} {path!r} not found")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise error(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold {expected}, got {type(data).__name__}")
    return data
