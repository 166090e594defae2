"""`RewardRunner`: calls every reward function (and reward model) on a batch and returns an (N, K) reward matrix.

One runner serves every online trainer. It resolves `reward_funcs` entries (`rewards/resolve.py`), calls each with
the protocol's keywords (`rewards/protocol.py`), runs `async def` functions concurrently on a private event loop in
a daemon thread (so it works the same inside Jupyter, where the calling thread already runs a loop, and async
clients created on the first call stay bound to one loop), checks every output and turns None into NaN.
Function errors are re-raised as one line that names the function.

NaN returned by a function is handled like None (left out of sums, means and standard deviations; a completion
that no function scored gets advantage 0), with a warning the first time each function does it, and counted:
`last_nan_counts` (this batch, per function) and `nan_totals` (since the runner was made), which online trainers
log as `rewards/<name>/nan_frac`. A function that returns NaN for every completion of a batch is an error (one
line naming it): that is a bug in the function, and training on no signal would hide it.

TRL's logging hooks: every function also receives `log_extra(column, values)` (a column of the completions table,
one value per completion) and `log_metric(name, value)` (a scalar averaged into the logged metrics); after a call,
`logged_columns` and `logged_metrics` hold what the functions logged (reset at each call).

Aggregation is nan-aware: `weighted_sum` is Σ_k w_k · r_ik over the functions that gave a value, NaN only when none
did. What a trainer does with an all-NaN row (advantage 0, …) is the trainer's choice.

Not here: the built-in rewards (`rewards/builtin.py`), advantages (`algorithms/`), distributed gathering (trainers).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from posttrain.errors import RewardFunctionError, UserError
from posttrain.rewards.protocol import check_rewards, reward_name
from posttrain.rewards.resolve import resolve_reward_func
from posttrain.rewards.reward_model import RewardModelScorer

logger = logging.getLogger(__name__)
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def weighted_sum(rewards: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(N, K) rewards, K weights → (N,) Σ_k w_k · r_ik, skipping NaN entries; NaN where a whole row is NaN."""
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    total = (rewards * weights).nansum(dim=1)
    return total.masked_fill(rewards.isnan().all(dim=1), float("nan"))


def _is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _dedupe(names: list[str]) -> list[str]:
    """Second and later uses of a name get _2, _3, … so every function has its own metric key."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


class BackgroundLoop:
    """An asyncio loop in a daemon thread named `name`, started on first use; `submit` returns a concurrent Future
    (async reward functions here, async tools in `rollout/tools.py`)."""

    def __init__(self, name: str = "posttrain-rewards"):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock, self.name = threading.Lock(), name

    def submit(self, coroutine) -> Future:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        with self._lock:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    def __del__(self):  # the thread holds only the loop, so a dropped runner stops its thread here
        self.close()

    def __getstate__(self) -> dict:
        return {"name": self.name}  # threads do not pickle: a fresh loop starts on first use

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


async def _await(awaitable):
    return await awaitable


async def _gather(calls: list) -> list:
    return await asyncio.gather(*(func(**kwargs) for func, kwargs in calls), return_exceptions=True)


class RewardRunner:
    """`runner(prompts, completions, completion_ids, columns, trainer_state) -> (N, K)` float32 rewards on CPU.

    reward_funcs: a callable, a string (built-in name, module:function path, reward-model id) or a reward model,
        or a list mixing them; K = number of entries.
    reward_weights: K floats (default all 1.0), used by `weighted_sum`.
    reward_processing_classes: tokenizers for the reward models, a list aligned with reward_funcs (entries for plain
        functions are ignored; None = load the model's own); a single tokenizer = a list of one (TRL's rule).
    device: where reward models are moved (default: left where they are). batch_size / max_length: reward-model
        scoring batch size and left-truncation length.
    """

    def __init__(self, reward_funcs: Any, reward_weights: Sequence[float] | None = None,
                 reward_processing_classes: Any = None, device: str | torch.device | None = None,
                 batch_size: int = 32, max_length: int | None = None):
        entries = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not entries:
            raise UserError("reward_funcs is empty; give at least one reward function, name or reward model.")
        if reward_processing_classes is None:
            tokenizers = [None] * len(entries)
        else:  # one tokenizer stands for a list of one, as in TRL: it must then serve the only reward function
            tokenizers = list(reward_processing_classes) if isinstance(reward_processing_classes, (list, tuple)) \
                else [reward_processing_classes]
            if len(tokenizers) != len(entries):
                raise UserError(f"The number of reward_processing_classes ({len(tokenizers)}) must match the number "
                                f"of reward functions ({len(entries)}); give a list with one per reward function "
                                "(None for plain functions).")
        self.funcs = [resolve_reward_func(e, tok, batch_size, max_length) for e, tok in zip(entries, tokenizers)]
        self.weights = [1.0] * len(self.funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(self.weights) != len(self.funcs):
            raise UserError(f"reward_weights has {len(self.weights)} values but there are {len(self.funcs)} "
                            f"reward functions ({', '.join(self.names)}); give one weight per function.")
        self.logged_columns: dict[str, list] = {}
        self.logged_metrics: dict[str, list[float]] = {}
        self._loop = BackgroundLoop()
        self.last_nan_counts = [0] * len(self.funcs)  # NaN values (not None) per function in the last batch
        self.nan_totals = [0] * len(self.funcs)
        if device is not None:
            self.to(device)

    @property
    def names(self) -> list[str]:
        """One distinct name per function, in order: `__name__`, or a reward model's directory/id basename."""
        return _dedupe([reward_name(f) for f in self.funcs])

    @property
    def entries(self) -> list:
        """reward_funcs as TRL's trainers hold them: each function, and each reward model as the model itself."""
        return [f.model if isinstance(f, RewardModelScorer) else f for f in self.funcs]

    @property
    def tokenizers(self) -> list:
        """Aligned with `entries`: each reward model's tokenizer, None for a function (TRL's
        reward_processing_classes)."""
        return [f.tokenizer if isinstance(f, RewardModelScorer) else None for f in self.funcs]

    def log_extra(self, column: str, values: list) -> None:
        """TRL's `log_extra` hook: a column of the completions table (one value per completion)."""
        self.logged_columns.setdefault(str(column), []).extend(list(values))

    def log_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric` hook: a scalar, averaged with the others logged under `name` this batch."""
        self.logged_metrics.setdefault(str(name), []).append(float(value))

    @property
    def reward_models(self) -> list[torch.nn.Module]:
        """The reward models among the functions (after `place`, as placed: possibly a DeepSpeed engine or FSDP
        module)."""
        return [f.model for f in self.funcs if isinstance(f, RewardModelScorer)]

    def place(self, prepare: Callable[[torch.nn.Module], torch.nn.Module],
              device: str | torch.device) -> RewardRunner:
        """Replace every reward model by `prepare(model)` and score on `device`: trainers pass
        `models/sharding.py`'s `prepare_frozen`, which shards them like the policy (DeepSpeed ZeRO-3, FSDP)."""
        for func in self.funcs:
            if isinstance(func, RewardModelScorer):
                func.place(prepare, device)
        return self

    def to(self, device: str | torch.device) -> RewardRunner:
        return self.place(lambda model: model.to(device), device)

    def weighted_sum(self, rewards: torch.Tensor) -> torch.Tensor:
        """(N, K) → (N,) with this runner's weights; see the module-level `weighted_sum`."""
        return weighted_sum(rewards, self.weights)

    def __len__(self) -> int:
        return len(self.funcs)

    def __repr__(self) -> str:
        return f"RewardRunner({', '.join(f'{n}×{w:g}' for n, w in zip(self.names, self.weights))})"

    def close(self) -> None:
        """Stop the background event loop (it is a daemon thread, so this is optional)."""
        self._loop.close()

    def _count_nan(self, names: list[str], outputs: list[list], n: int) -> None:
        """Count NaN (as opposed to None) per function; warn on a function's first NaN; refuse an all-NaN batch."""
        for k, values in enumerate(outputs):
            count = sum(1 for v in values if v is not None and math.isnan(float(v)))
            self.last_nan_counts[k] = count
            if not count:
                continue
            if count == n:
                raise UserError(f"reward function {names[k]!r} returned NaN for all {n} completions of this batch; "
                                "fix the function, or return None to mark completions as 'not applicable'.")
            if not self.nan_totals[k]:
                logger.warning("reward function %r returned NaN for %d of %d completions; they are treated like None "
                               "(left out of the reward statistics) and counted in rewards/%s/nan_frac. This "
                               "warning is shown once per function.", names[k], count, n, names[k])
            self.nan_totals[k] += count

    def _kwargs(self, prompts, completions, completion_ids, columns, trainer_state, extra) -> dict[str, Any]:
        n = len(completions)
        if len(prompts) != n or (completion_ids is not None and len(completion_ids) != n):
            raise UserError(f"prompts ({len(prompts)}), completions ({n}) and completion_ids "
                            f"({len(completion_ids) if completion_ids is not None else 'None'}) must align.")
        clash = sorted(set(columns) & set(_RESERVED))
        if clash:
            raise UserError(f"Dataset column(s) {clash} clash with reward-function arguments {list(_RESERVED)}; "
                            "rename them.")
        for name, values in columns.items():
            if len(values) != n:
                raise UserError(f"Column {name!r} has {len(values)} values for {n} completions; columns must be "
                                "lists aligned with the completions.")
        return {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns,
                "trainer_state": trainer_state, "log_extra": self.log_extra, "log_metric": self.log_metric, **extra}

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None,
                 columns: dict[str, list] | None = None, trainer_state: Any = None, **extra: Any) -> torch.Tensor:
        kwargs = self._kwargs(prompts, completions, completion_ids, dict(columns or {}), trainer_state, extra)
        n, names = len(completions), self.names
        self.logged_columns, self.logged_metrics = {}, {}

        def own_copy() -> dict[str, Any]:
            # Each function gets its own lists, so one that mutates its input cannot change what the next sees.
            return {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}

        outputs: list[Any] = [None] * len(self.funcs)
        async_index = [k for k, f in enumerate(self.funcs) if _is_async(f)]
        pending = (self._loop.submit(_gather([(self.funcs[k], own_copy()) for k in async_index]))
                   if async_index else None)
        for k, func in enumerate(self.funcs):  # sync functions run here while the async ones run on the loop
            if k in async_index:
                continue
            try:
                outputs[k] = func(**own_copy())
                if inspect.isawaitable(outputs[k]):  # e.g. a lambda or partial around an async function
                    outputs[k] = self._loop.submit(_await(outputs[k])).result()
            except Exception as e:
                if pending is not None:
                    pending.cancel()
                raise RewardFunctionError(f"reward function {names[k]!r} raised {_one_line(e)}") from e
        if pending is not None:
            for k, result in zip(async_index, pending.result()):
                if isinstance(result, BaseException):
                    raise RewardFunctionError(f"reward function {names[k]!r} raised {_one_line(result)}") from result
                outputs[k] = result
        columns_out = [check_rewards(names[k], outputs[k], n) for k in range(len(self.funcs))]
        self._count_nan(names, outputs, n)
        rewards = torch.tensor(columns_out, dtype=torch.float32).reshape(len(self.funcs), n).T.contiguous()
        unscored = int(rewards.isnan().all(dim=1).sum()) if n else 0
        if unscored:
            logger.warning("%d of %d completions got None (or NaN) from every reward function (%s); their total reward "
                           "is NaN.", unscored, n, ", ".join(names))
        return rewards
