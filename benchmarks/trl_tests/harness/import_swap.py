"""The import swap: `from trl.X import A` in a TRL test becomes `A = swap_import("posttrain.X", "A")`.

A name posttrain lacks (or a module path it does not have) does not stop the whole test file: it becomes a
`Missing` placeholder that raises `MissingName` when a test uses it, so only the tests that need the
name fail, each with a message naming the TRL import that has no posttrain counterpart.

When the module path is missing but `posttrain` exports the name at its top level (`posttrain.ORPOConfig` for
`trl.experimental.orpo.ORPOConfig`), that object is used and the name is recorded in FALLBACKS: the report
counts such a test as passing "by name" but not "by TRL's import path" (the plugin looks for the name in the
test's source).
"""

from __future__ import annotations

import importlib
import re


class MissingName(ImportError):
    pass


class Missing:
    def __init__(self, module: str, name: str, reason: str):
        object.__setattr__(self, "_where", f"{module}.{name}" if name else module)
        object.__setattr__(self, "_reason", reason)

    def _fail(self, *args, **kwargs):
        raise MissingName(f"missing name: {self._where} ({self._reason})")

    __call__ = _fail
    __iter__ = _fail
    __getitem__ = _fail
    __enter__ = _fail
    __setattr__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        self._fail()

    def __mro_entries__(self, bases):
        self._fail()

    def __repr__(self):
        return f"<missing {self._where}>"


FALLBACKS: dict[str, str] = {}  # name -> the TRL-style posttrain path that was missing


def _top_level(module: str, name: str):
    import os

    if not module.startswith("posttrain") or os.environ.get("TRL_HARNESS_STRICT_PATHS") == "1":
        return None
    try:
        return getattr(importlib.import_module("posttrain"), name)
    except Exception:
        return None


def swap_import(module: str, *names: str):
    """Import `names` from posttrain `module`; one value for one name, a tuple for several."""
    try:
        mod = importlib.import_module(module)
        reason = None
    except Exception as exc:  # ModuleNotFoundError, or the module itself fails to import
        mod, reason = None, f"module {module} does not import: {type(exc).__name__}: {exc}".splitlines()[0]
    values = []
    for name in names:
        if mod is None or not hasattr(mod, name):
            fallback = _top_level(module, name)
            if fallback is not None:
                FALLBACKS[name] = f"{module}.{name}"
                values.append(fallback)
                continue
        if mod is None:
            values.append(Missing(module, name, reason))
            continue
        try:
            values.append(getattr(mod, name))
        except AttributeError:
            try:  # a submodule imported by name (`from posttrain.trainer import sft_trainer`)
                values.append(importlib.import_module(f"{module}.{name}"))
            except Exception:
                values.append(Missing(module, name, f"module {module} has no {name}"))
    return values[0] if len(values) == 1 else tuple(values)


def swap_module(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:
        return Missing(module, "", f"{type(exc).__name__}: {exc}".splitlines()[0])


def env_probe(*names: str):
    """TRL's `trl.import_utils.is_<package>_available` probes, answered from the environment (find_spec), so the
    test infrastructure neither depends on TRL's version nor imports TRL on the posttrain side."""
    import importlib.util

    special = {"liger_kernel": "liger_kernel", "math_verify": "math_verify"}
    values = []
    for name in names:
        m = re.fullmatch(r"is_(\w+)_available", name)
        if not m:
            values.append(Missing("trl.import_utils", name, "not an availability probe"))
            continue
        package = special.get(m.group(1), m.group(1))

        def probe(package=package, *args, **kwargs):
            return importlib.util.find_spec(package) is not None

        values.append(probe)
    return values[0] if len(values) == 1 else tuple(values)
