"""Multi-turn rollouts: the model calls tools while it generates, sees their results and continues.

`AgentLoop.run` produces the same `Rollout` record as a one-turn rollout (`rollout/types.py`), so every online
method trains on it unchanged: the completion region holds every model turn and every tool result, in order;
`completion_mask` is 1 on all of them (they are context), `loss_mask` is 1 on the model's own tokens only (tool
results and the chat template's turn headers around them carry no loss, no gradient, no KL). One round is: parse
each ended turn for tool calls (`rollout/tools.py`), run every rollout's calls as one batch (concurrently), append
the results as the chat template renders `tool` messages followed by the next generation prompt — ids taken from
two renderings of a dummy conversation, so nothing already generated is re-tokenised — and generate the next turn
of every rollout that called a tool, all rows together. Rounds stop at `max_iterations`, when no rollout calls a tool,
or when a rollout's completion region (model and tool tokens) would pass `max_completion_length`.

Environments (`environment_factory`): one instance per rollout (pooled across batches); `reset(**row)` may return
text appended to the last user message; its public methods are the rollout's tools; a `get_reward()` becomes a
reward source. `custom_rollout` runs a user `rollout_func` (TRL's contract) into the same record.

Not here: generation itself (`rollout/hf.py`, vLLM; the trainer passes a `generate` callable), scoring (`rewards/`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.rollout.hf import left_pad, right_pad
from posttrain.rollout.tools import (
    ToolRunner,
    environment_tools,
    parse_tool_calls,
    strip_tool_calls,
    tool_name,
    tool_schemas,
)
from posttrain.rollout.types import Rollout

AGENTIC_ARGUMENTS = ("tools", "environment_factory", "rollout_func")  # the trainer arguments (TRL's names)

# generate(prompt_ids (unique), per_prompt count(s), max_new_tokens) → one (token ids up to EOS, ended) per row
Generate = Callable[[list[list[int]], "int | list[int]", int], list[tuple[list[int], bool]]]


@dataclass
class Episode:
    """One rollout's state through the rounds."""

    prompt: list[dict]
    prompt_ids: list[int]
    tools: dict[str, Callable]
    environment: Any = None
    ids: list[int] = field(default_factory=list)  # the completion region: model turns and tool results
    mask: list[int] = field(default_factory=list)  # 1 on the model's tokens
    messages: list[dict] = field(default_factory=list)  # the completion as messages
    ended: bool = False  # the last model turn ended with EOS
    truncated: bool = False
    tool_calls: int = 0
    tool_failures: int = 0
    turns: int = 0
    pending: list = field(default_factory=list)  # the calls of the last turn, not yet run


def _environment_reward(cls: type) -> Callable:
    """reward(environments, **kwargs): each rollout's `get_reward()` where its environment is a `cls`, else None."""
    if inspect.iscoroutinefunction(cls.get_reward):
        async def reward(environments, **kwargs):
            return [await env.get_reward() if type(env) is cls else None for env in environments]
    else:
        def reward(environments, **kwargs):
            return [env.get_reward() if type(env) is cls else None for env in environments]
    reward.__name__ = cls.__name__
    return reward


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class AgentLoop:
    """tools: callables (sync or async); environment_factory: a callable returning an environment, or a dict of them
    selected by each row's `environment` column; max_iterations: tool rounds per rollout (None = no limit);
    timeout: seconds per tool call."""

    def __init__(self, tokenizer, tools: list[Callable] | None = None, environment_factory: Any = None,
                 max_iterations: int | None = None, timeout: float | None = 30.0,
                 template_kwargs: dict | None = None):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.template_kwargs = dict(template_kwargs or {})  # chat_template_kwargs: every rendering gets them
        self.tools = list(tools or [])
        self.multi_environment = isinstance(environment_factory, dict)
        if environment_factory is None:
            self.factories: dict[Any, Callable] = {}
        elif self.multi_environment:
            self.factories = dict(environment_factory)
        else:
            self.factories = {None: environment_factory}
        self._pools: dict[Any, list] = {name: [] for name in self.factories}
        self.reward_classes: list[type] = []  # environment classes with a get_reward, one reward column each
        self.schemas: dict[Any, list[dict]] = {}
        for name, factory in self.factories.items():  # one probe instance (kept in the pool) per environment
            env = factory()
            if not callable(getattr(env, "reset", None)):
                raise UserError(f"environment_factory{'' if name is None else f'[{name!r}]'} made a "
                                f"{type(env).__name__} without a reset() method; an environment needs reset().")
            self._pools[name].append(env)
            self.schemas[name] = tool_schemas(self.tools + environment_tools(env))
            if callable(getattr(env, "get_reward", None)) and type(env) not in self.reward_classes:
                self.reward_classes.append(type(env))
        if not self.factories:
            self.schemas[None] = tool_schemas(self.tools)
        self.max_iterations = max_iterations
        self.runner = ToolRunner(timeout)
        self._suffix_cache: dict[tuple, list[int]] = {}
        self._check_template()

    def _check_template(self) -> None:
        schemas = next(iter(self.schemas.values()))
        if not schemas:
            return
        probe = [{"role": "user", "content": "x"}]
        render = self.tokenizer.apply_chat_template
        if render(probe, tools=schemas, tokenize=False) == render(probe, tokenize=False):
            raise UserError("The tokenizer's chat template ignores tools, so the model would never see them; set "
                            "chat_template_path='posttrain/chatml-tools' (ChatML with Hermes-form tool calls) or a "
                            "tool-calling template of the model's family.")

    # ---- rewards from environments ------------------------------------------------------------------------------
    def environment_rewards(self) -> list[Callable]:
        """One reward function per environment class with `get_reward()`, named after the class: that class's
        rollouts get their environment's reward, others None (not applicable)."""
        return [_environment_reward(cls) for cls in self.reward_classes]

    # ---- episodes -----------------------------------------------------------------------------------------------
    def _environment(self, name, used: dict) -> Any:
        if name not in self.factories:
            raise UserError(f"A row has environment={name!r}, not one of the environments given to "
                            f"environment_factory: {sorted(map(str, self.factories))}.")
        pool, index = self._pools[name], used.get(name, 0)
        if index == len(pool):
            pool.append(self.factories[name]())
        used[name] = index + 1
        return pool[index]

    def episodes(self, rows: list[dict], max_prompt_length: int | None) -> list[Episode]:
        out, used = [], {}
        for row in rows:
            prompt = row["prompt"]
            if not isinstance(prompt, list):
                raise UserError("Tool-calling rollouts need conversational prompts (a list of messages, e.g. "
                                "[{'role': 'user', 'content': ...}]); this prompt is a string.")
            env, name = None, row.get("environment") if self.multi_environment else None
            if self.factories:
                env = self._environment(name, used)
                reset_args = {k: v for k, v in row.items() if k != "environment"} if self.multi_environment else row
                observation = env.reset(**reset_args)
                if observation:
                    prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
            tools = self.tools + (environment_tools(env) if env is not None else [])
            schemas = self.schemas[name if self.factories else None]
            ids = self.tokenizer.apply_chat_template(prompt, tools=schemas or None, add_generation_prompt=True,
                                                     tokenize=False, **{**self.template_kwargs,
                                                                        **(row.get("chat_template_kwargs") or {})})
            ids = _text_ids(self.tokenizer, ids)
            if max_prompt_length:
                ids = ids[-max_prompt_length:]
            out.append(Episode(prompt, ids, {tool_name(t): t for t in tools}, env))
        return out

    # ---- the rounds ---------------------------------------------------------------------------------------------
    def _add_turn(self, ep: Episode, ids: list[int], ended: bool, budget: int) -> None:
        kept = ids[:max(budget - len(ep.ids), 0)]
        ep.ended = ended and len(kept) == len(ids)
        ep.ids += kept
        ep.mask += [1] * len(kept)
        ep.turns += 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        calls = parse_tool_calls(text, self.tokenizer) if ep.ended else []
        message = {"role": "assistant", "content": text}
        if calls:
            message = {"role": "assistant", "content": strip_tool_calls(text),
                       "tool_calls": [c.as_message() for c in calls if c.error is None]}
        ep.messages.append(message)
        ep.pending = calls

    def tool_suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """The ids the chat template puts after a model turn that called tools: the tool messages and the next
        generation prompt, from two renderings of a dummy conversation (the prefix cut at its last EOS)."""
        key = tuple((m["name"], m["content"]) for m in tool_messages)
        if key in self._suffix_cache:
            return self._suffix_cache[key]
        call = {"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}
        dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        render = self.tokenizer.apply_chat_template
        prefix = _text_ids(self.tokenizer, render(dummy, tokenize=False, **self.template_kwargs))
        full = _text_ids(self.tokenizer, render(dummy + tool_messages, add_generation_prompt=True, tokenize=False,
                                                **self.template_kwargs))
        eos = self.tokenizer.eos_token_id
        ends = [i for i, t in enumerate(prefix) if t == eos]
        if ends:
            prefix = prefix[:ends[-1] + 1]
        if full[:len(prefix)] != prefix:
            raise UserError("The chat template is not prefix-preserving (rendering tool results changes the tokens "
                            "before them); set chat_template_path='posttrain/chatml-tools' or a training template.")
        suffix = full[len(prefix):]
        if len(self._suffix_cache) < 4096:
            self._suffix_cache[key] = suffix
        return suffix

    def run(self, rows: list[dict], generate: Generate, max_completion_length: int,
            max_prompt_length: int | None = None) -> Rollout:
        """Every row's interaction, as a Rollout with completions as message lists and per-row tool counts."""
        eps = self.episodes(rows, max_prompt_length)
        L = max_completion_length
        unique, counts = [], []
        for ep in eps:  # consecutive rows with the same prompt share one prefill
            if unique and unique[-1] == ep.prompt_ids:
                counts[-1] += 1
            else:
                unique.append(ep.prompt_ids)
                counts.append(1)
        per_prompt = counts[0] if len(set(counts)) == 1 else counts
        for ep, (ids, ended) in zip(eps, generate(unique, per_prompt, L)):
            self._add_turn(ep, ids, ended, L)
        rounds = 0
        while self.max_iterations is None or rounds < self.max_iterations:
            calling = [ep for ep in eps if ep.pending]
            if not calling:
                break
            jobs = [(call, ep.tools) for ep in calling for call in ep.pending]
            results = iter(self.runner.run(jobs))
            going = []
            for ep in calling:
                done = [next(results) for _ in ep.pending]
                ep.tool_calls += len(done)
                ep.tool_failures += sum(r.failed for r in done)
                ep.pending = []
                messages = [r.as_message() for r in done]
                suffix = self.tool_suffix_ids(messages)
                if len(ep.ids) + len(suffix) >= L:  # no room for the results and a reply: the rollout stops here
                    ep.truncated = True
                    continue
                ep.ids += suffix
                ep.mask += [0] * len(suffix)
                ep.messages += messages
                going.append(ep)
            if not going:
                break
            budget = max(L - len(ep.ids) for ep in going)
            outputs = generate([ep.prompt_ids + ep.ids for ep in going], 1, budget)
            for ep, (ids, ended) in zip(going, outputs):
                self._add_turn(ep, ids, ended, L)
            rounds += 1
        return self._rollout(eps)

    def _rollout(self, eps: list[Episode]) -> Rollout:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([ep.prompt_ids for ep in eps], pad)
        completion_ids, completion_mask = right_pad([ep.ids for ep in eps], pad)
        loss_mask = right_pad([ep.mask for ep in eps], 0, completion_ids.shape[1])[0]
        truncated = torch.tensor([ep.truncated or not ep.ended for ep in eps])
        rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                          completion_mask=completion_mask, is_truncated=truncated, loss_mask=loss_mask,
                          prompts=[ep.prompt for ep in eps], completions=[ep.messages for ep in eps])
        rollout.tool_calls = torch.tensor([float(ep.tool_calls) for ep in eps])
        rollout.tool_failures = torch.tensor([float(ep.tool_failures) for ep in eps])
        rollout.turns = torch.tensor([float(ep.turns) for ep in eps])
        if self.factories:
            rollout.reward_kwargs["environments"] = [ep.environment for ep in eps]
        return rollout

    def close(self) -> None:
        self.runner.close()


def agentic_rollouts(tokenizer, args, tools=None, environment_factory=None, rollout_func=None):
    """(AgentLoop or None, rollout_func or None) for a trainer's arguments; `args.tools` and
    `args.environment_factory` ('module:function' paths, the CLI's flags) stand in for arguments not given."""
    from posttrain.rewards.resolve import load_function

    tools = tools if tools is not None else [load_function(spec, "tool") for spec in getattr(args, "tools", None) or []]
    if environment_factory is None and getattr(args, "environment_factory", None):
        environment_factory = load_function(args.environment_factory, "environment factory")
    tools = list(tools) if isinstance(tools, (list, tuple)) else [tools] if tools else []
    for tool in tools:
        if not callable(tool):
            raise UserError(f"tools must be functions; got a {type(tool).__name__}.")
    if rollout_func is not None and (tools or environment_factory is not None):
        raise UserError("Give rollout_func or tools/environment_factory, not both: a rollout_func runs its own tools.")
    if rollout_func is not None and not callable(rollout_func):
        raise UserError(f"rollout_func must be a function (prompts, trainer) -> dict; got a "
                        f"{type(rollout_func).__name__}.")
    agent = None
    if tools or environment_factory is not None:
        agent = AgentLoop(tokenizer, tools, environment_factory, getattr(args, "max_tool_calling_iterations", None),
                          getattr(args, "tool_call_timeout", 30.0), getattr(args, "chat_template_kwargs", None))
    return agent, rollout_func


def custom_rollout(rollout_func: Callable, prompts: list, trainer: Any, counts: list[int], pad_id: int,
                   eos_ids: set[int]) -> Rollout:
    """A user `rollout_func(prompts, trainer)` (TRL's contract: the unique prompts of this process in, a dict with
    prompt_ids, completion_ids, logprobs and optional env_mask out — one entry per completion, `counts[i]`
    completions of prompt i in order) as a Rollout. env_mask (1 = the model's token) is the loss mask; every other
    key with one value per completion reaches the reward functions as a keyword argument."""
    out = rollout_func(prompts, trainer)
    if not isinstance(out, dict) or not {"prompt_ids", "completion_ids"} <= set(out):
        raise UserError("rollout_func must return a dict with 'prompt_ids', 'completion_ids' and 'logprobs' (lists "
                        "with one entry per completion).")
    n = sum(counts)
    completion_ids = [list(c) for c in out["completion_ids"]]
    prompt_ids = [list(p) for p in out["prompt_ids"]]
    if len(prompt_ids) == len(counts) and len(counts) != n:  # one per prompt: repeat for its completions
        prompt_ids = [p for p, c in zip(prompt_ids, counts) for _ in range(c)]
    if len(completion_ids) != n or len(prompt_ids) != n:
        raise UserError(f"rollout_func returned {len(completion_ids)} completions and {len(prompt_ids)} prompt_ids "
                        f"for {len(prompts)} prompts × their completions ({n} expected).")
    masks = out.get("env_mask") or out.get("tool_mask")
    pids, pmask = left_pad(prompt_ids, pad_id)
    width = max(max((len(c) for c in completion_ids), default=1), 1)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    loss = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(completion_ids):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
        loss[i, :len(c)] = torch.tensor(masks[i], dtype=torch.long) if masks is not None else 1
    truncated = torch.tensor([not c or c[-1] not in eos_ids for c in completion_ids])
    rollout = Rollout(prompt_ids=pids, prompt_mask=pmask, completion_ids=ids, completion_mask=mask,
                      is_truncated=truncated, loss_mask=loss)
    reserved = {"prompt_ids", "completion_ids", "logprobs", "logprob_token_ids", "env_mask", "tool_mask"}
    rollout.reward_kwargs = {k: list(v) for k, v in out.items()
                             if k not in reserved and isinstance(v, (list, tuple)) and len(v) == n}
    return rollout
