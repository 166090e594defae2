"""Tools for agentic rollouts: their schemas, the tool calls in generated text, and running them safely.

Lives here: `tool_schemas` (transformers' own `get_json_schema`: type hints + Google-style docstring),
`environment_tools` (an environment's public methods), `parse_tool_calls` (transformers' `parse_response` where the
tokenizer declares a response template, else the Hermes/Qwen form `<tool_call>{"name": …, "arguments": …}</tool_call>`)
and `ToolRunner`, which runs one batch of calls — `async def` tools concurrently on a background event loop, plain
functions on a thread pool, each under a timeout — and turns every fault (an exception, a hang, malformed JSON, an
unknown name, wrong arguments) into an error message for the model, counted, instead of an exception. What tools
print goes to a buffer while they run, never into the progress line or the completions.

Not here: the multi-turn loop and its token masks (`rollout/agentic.py`), the trainer wiring (`trainers/online.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.errors import UserError
from posttrain.rewards.runner import BackgroundLoop

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NOT_TOOLS = ("reset", "get_reward")  # environment methods that are the environment's own protocol


@dataclass
class ToolCall:
    """One call the model asked for; `error` set when it cannot be run (malformed JSON, no name)."""

    name: str
    arguments: dict
    error: str | None = None

    def as_message(self) -> dict:
        """The OpenAI-style `tool_calls` entry chat templates render."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolResult:
    name: str
    content: str
    failed: bool

    def as_message(self) -> dict:
        return {"role": "tool", "name": self.name, "content": self.content}


def tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def is_async_tool(tool: Callable) -> bool:
    return inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(getattr(tool, "__call__", None))


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """JSON schemas of plain Python functions (bound methods too), via transformers' `get_json_schema`; a function
    it cannot describe (no docstring, an argument without a type hint or description) is a one-line UserError."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        try:
            schemas.append(get_json_schema(tool))
        except Exception as e:  # transformers raises its own TypeHintParsingException / DocstringParsingException
            raise UserError(f"tool {tool_name(tool)!r} cannot be described to the model: {str(e).splitlines()[0]} "
                            "(a tool needs type hints and a Google-style docstring with an Args: section).") from e
    return schemas


def environment_tools(environment: Any) -> list[Callable]:
    """An environment's public methods (not `reset`/`get_reward`, not `_private`) as bound methods: its tools."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if not name.startswith("_") and name not in _NOT_TOOLS]


def _call_from(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        return ToolCall("", {}, "a tool call must be a JSON object with 'name' and 'arguments'")
    if "function" in obj and isinstance(obj["function"], dict):  # OpenAI form {"type": "function", "function": …}
        obj = obj["function"]
    name, arguments = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some formats carry the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(str(name or ""), {}, f"the arguments are not valid JSON ({e.msg})")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, "a tool call needs a 'name'")
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, "'arguments' must be a JSON object")
    return ToolCall(name, arguments)


def parse_tool_calls(text: str, tokenizer: Any = None) -> list[ToolCall]:
    """The tool calls in one generated turn. With a tokenizer that declares a response template (transformers'
    `parse_response`), that parser decides; otherwise every `<tool_call>…</tool_call>` block (an unclosed last block
    too) is one call in the Hermes/Qwen form. Malformed blocks become calls with `error` set."""
    if tokenizer is not None and getattr(tokenizer, "response_template", None) is not None:
        try:
            parsed = tokenizer.parse_response(text, prefix="")
        except Exception as e:  # the model wrote something the template's parser rejects
            return [ToolCall("", {}, f"the response could not be parsed ({type(e).__name__})")]
        return [_call_from(call) for call in (parsed or {}).get("tool_calls") or []]
    calls = []
    for block in _HERMES.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"the tool call is not valid JSON ({e.msg})"))
            continue
        calls.append(_call_from(obj))
    return calls


def strip_tool_calls(text: str) -> str:
    """The text of a turn without its `<tool_call>` blocks (the message's content; the calls go to `tool_calls`)."""
    return _HERMES.sub("", text)


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _error(message: str) -> str:
    return f"Error: {message}"


class ToolRunner:
    """Runs a batch of tool calls (every pending call of every rollout at once) and returns one result per call.

    timeout: seconds each call may take (None = no limit); a sync tool that hangs is abandoned (its thread is left
    to finish on its own) and the model is told it timed out. max_workers: threads for sync tools.
    `captured` holds what the tools printed (stdout and stderr) during the last batch."""

    def __init__(self, timeout: float | None = 30.0, max_workers: int = 16):
        self.timeout = timeout
        self.max_workers = max_workers
        self._loop = BackgroundLoop("posttrain-tools")  # async tools of every rollout run on it
        self.captured = ""

    def run(self, calls: list[tuple[ToolCall, dict[str, Callable]]]) -> list[ToolResult]:
        """calls: (the call, the tools visible to its rollout by name). Results in the same order."""
        results: list[ToolResult | None] = [None] * len(calls)
        sync, asyn = [], []
        for i, (call, tools) in enumerate(calls):
            if call.error is not None:
                results[i] = ToolResult(call.name or "unknown", _error(call.error), True)
            elif call.name not in tools:
                known = ", ".join(sorted(tools)) or "none"
                results[i] = ToolResult(call.name, _error(f"unknown tool {call.name!r}; available tools: {known}"),
                                        True)
            else:
                (asyn if is_async_tool(tools[call.name]) else sync).append((i, call, tools[call.name]))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            pending = self._loop.submit(self._gather(asyn)) if asyn else None
            self._run_sync(sync, results)
            if pending is not None:
                for i, result in pending.result():
                    results[i] = result
        self.captured = buffer.getvalue()
        return results

    def _run_sync(self, sync: list, results: list) -> None:
        if not sync:
            return
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_workers, len(sync)),
                                                     thread_name_prefix="posttrain-tool")
        futures = [(i, call, pool.submit(func, **call.arguments)) for i, call, func in sync]
        done, _ = concurrent.futures.wait([f for _, _, f in futures], timeout=self.timeout)
        for i, call, future in futures:
            if future not in done:
                results[i] = ToolResult(call.name, _error(f"tool {call.name!r} timed out after {self.timeout:g}s"),
                                        True)
                continue
            error = future.exception()
            results[i] = (ToolResult(call.name, _format(future.result()), False) if error is None
                          else ToolResult(call.name, _error(_describe(call.name, error)), True))
        pool.shutdown(wait=False, cancel_futures=True)  # a hung tool keeps its thread; nobody waits for it

    async def _gather(self, asyn: list) -> list[tuple[int, ToolResult]]:
        async def one(i, call, func):
            try:
                value = await asyncio.wait_for(func(**call.arguments), self.timeout)
                return i, ToolResult(call.name, _format(value), False)
            except asyncio.TimeoutError:
                return i, ToolResult(call.name, _error(f"tool {call.name!r} timed out after {self.timeout:g}s"), True)
            except Exception as e:
                return i, ToolResult(call.name, _error(_describe(call.name, e)), True)

        return await asyncio.gather(*(one(*job) for job in asyn))

    def close(self) -> None:
        self._loop.close()


def _describe(name: str, error: BaseException) -> str:
    text = str(error).strip().splitlines()
    detail = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return f"tool {name!r} raised {detail}"
