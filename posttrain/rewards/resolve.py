"""Turning one `reward_funcs` entry into a callable of the reward protocol.

An entry is, in this order of precedence:
    a reward model (any `torch.nn.Module`)   → `RewardModelScorer` with the given or its own tokenizer
    a callable                               → itself (it must accept **kwargs)
    a built-in name ("accuracy_reward")      → `BUILTIN_REWARDS[name]`; "trl.rewards.<name>" maps to it too
    "module:function", "path/file.py:function" or "package.module.function"
                                             → imported (the working directory is put on sys.path first)
    a near-miss of a built-in name           → ValueError "did you mean …" (no slow Hub lookup for a typo)
    anything else                            → a reward-model id or directory (built-in names such as
                                               "posttrain/tiny" included), loaded as a one-label sequence
                                               classifier with its tokenizer

Not here: calling the resolved functions (`rewards/runner.py`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any

from posttrain.errors import UserError
from posttrain.rewards.builtin import BUILTIN_REWARDS
from posttrain.rewards.protocol import reward_name

_IDENT = r"[A-Za-z_]\w*"
_COLON_PATH = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*|[^:]+\.py):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")
_DOTTED_PATH = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*)\.(?P<attr>{_IDENT})$")
_TRL_PREFIXES = ("trl.rewards.", "trl.rewards:")


def _check_accepts_kwargs(func: Any, name: str) -> None:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature; let the call decide
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise UserError(f"reward function {name!r} must accept **kwargs: it is called with prompts=, completions=, "
                        "completion_ids=, trainer_state= and every dataset column as keywords, e.g. "
                        f"`def {name}(completions, **kwargs)`.")


def _import_module(module: str, spec: str, what: str = "reward function"):
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does, so a rewards.py beside the config is found
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise UserError(f"Cannot load {what} {spec!r}: file {module!r} does not exist.")
        name = "posttrain_user_rewards_" + re.sub(r"\W", "_", path)
        loader_spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = loaded
        loader_spec.loader.exec_module(loaded)
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"Cannot load {what} {spec!r}: {e} (looked in the working directory {cwd} and "
                        "sys.path).") from e


def load_function(spec: str, what: str = "reward function"):
    """The callable named by `module:function`, `file.py:function` or `module.function` (`what` names it in
    errors: a reward function, a tool, an environment factory)."""
    match = _COLON_PATH.match(spec) or _DOTTED_PATH.match(spec)
    if match is None:
        raise UserError(f"{spec!r} is not a 'module:function' or 'module.function' path.")
    target = _import_module(match["module"], spec, what)
    for part in match["attr"].split("."):
        if not hasattr(target, part):
            raise UserError(f"Cannot load {what} {spec!r}: module {match['module']!r} has no attribute "
                            f"{match['attr']!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"Reward function {spec!r} is a {type(target).__name__}, not a callable.")
    return target


def _refuse_language_model(spec: str) -> None:
    """A checkpoint saved as a causal LM has no trained score head: loaded as a reward model its head would be
    random, and training would run on random rewards. Refuse it (reward models are sequence classifiers)."""
    from transformers import AutoConfig

    from posttrain.models.loading import resolve_model_path

    try:
        architectures = AutoConfig.from_pretrained(resolve_model_path(spec)).architectures or []
    except (OSError, ValueError):
        return  # not a checkpoint we can read here: the load below says what is wrong
    if architectures and not any(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
                                 for a in architectures):
        raise UserError(f"{spec!r} is a language model ({architectures[0]}), not a reward model: its score head "
                        "would be random and training would run on random rewards. Give a checkpoint trained with "
                        "`posttrain reward` (a sequence classifier), or a reward function.")


def _load_reward_model(spec: str, tokenizer, batch_size: int, max_length: int | None):
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.loading import load_pretrained_model, load_tokenizer
    from posttrain.rewards.reward_model import RewardModelScorer

    _refuse_language_model(spec)
    try:
        model = load_pretrained_model(spec, AutoModelForSequenceClassification, num_labels=1)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"Unknown reward function {spec!r}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}), "
                        "not a 'module:function' path, and it could not be loaded as a reward model: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return RewardModelScorer(model, tokenizer, batch_size, max_length, name=os.path.basename(os.path.normpath(spec)))


def resolve_reward_func(entry: Any, tokenizer=None, batch_size: int = 32, max_length: int | None = None):
    """One `reward_funcs` entry as a protocol callable; `tokenizer` is used only when the entry is a reward model."""
    import torch

    if isinstance(entry, torch.nn.Module):
        from posttrain.models.loading import load_tokenizer
        from posttrain.rewards.reward_model import RewardModelScorer

        if tokenizer is None:
            source = getattr(entry.config, "_name_or_path", None)
            if not source:
                raise UserError("A reward model given as an object needs its tokenizer: pass "
                                "reward_processing_classes=[tokenizer].")
            tokenizer = load_tokenizer(source)
        return RewardModelScorer(entry, tokenizer, batch_size, max_length)
    if callable(entry):
        _check_accepts_kwargs(entry, reward_name(entry))
        return entry
    if not isinstance(entry, str):
        raise UserError(f"A reward_funcs entry must be a callable, a name or a reward model; got "
                        f"{type(entry).__name__}.")
    spec = entry.strip()
    for prefix in _TRL_PREFIXES:  # TRL's guides write trl.rewards.accuracy_reward; the built-in is the same reward
        if spec.startswith(prefix) and spec[len(prefix):] in BUILTIN_REWARDS:
            spec = spec[len(prefix):]
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if not os.path.exists(spec) and (_COLON_PATH.match(spec) or _DOTTED_PATH.match(spec)):
        func = load_function(spec)
        _check_accepts_kwargs(func, reward_name(func))
        return func
    close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1, cutoff=0.8)
    if close and "/" not in spec and not os.path.exists(spec):
        # A typo of a built-in name: say so now rather than after a minute of Hub retries.
        raise UserError(f"Unknown reward function {spec!r}; did you mean {close[0]!r}? Built-in rewards: "
                        f"{', '.join(BUILTIN_REWARDS)}.")
    return _load_reward_model(spec, tokenizer, batch_size, max_length)
