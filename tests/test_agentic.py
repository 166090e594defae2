"""Agentic (multi-turn, tool-calling) rollouts: tool schemas and parsing, faults that stay inside the rollout, the
token masks of a multi-turn rollout (tool results are context, never trained), the loss over model turns, and GRPO /
RLOO training with tools=, environment_factory= and rollout_func= on the built-in tiny model. Generation is scripted
where a test needs tool calls (a random tiny model never writes one)."""

import asyncio
import json
import time

import datasets
import pytest
import torch

from posttrain.configs.grpo import GRPOConfig
from posttrain.configs.rloo import RLOOConfig
from posttrain.models.loading import builtin_chat_template_path, load_tokenizer
from posttrain.models.logprobs import completion_logps, lm_head_chunking
from posttrain.rollout.agentic import AgentLoop
from posttrain.rollout.tools import ToolCall, ToolRunner, parse_tool_calls, tool_schemas
from posttrain.trainers.grpo import GRPOTrainer
from posttrain.trainers.rloo import RLOOTrainer

MODEL = "posttrain/tiny"
TOOLS_TEMPLATE = "posttrain/chatml-tools"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. "7 + 5".
    """
    print("noisy tool output")  # must not reach the progress line or the completions
    return str(eval(expression, {"__builtins__": {}}))


async def slow_add(a: int, b: int) -> int:
    """Add two integers slowly.

    Args:
        a: The first integer.
        b: The second integer.
    """
    await asyncio.sleep(0.3)
    return a + b


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool is broken")


def hangs(x: int) -> int:
    """Never returns in time.

    Args:
        x: Anything.
    """
    time.sleep(2)
    return x


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(MODEL)
    with open(builtin_chat_template_path(TOOLS_TEMPLATE)) as f:
        tok.chat_template = f.read()
    return tok


def _call(expr: str) -> str:
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "' + expr + '"}}</tool_call>'


def scripted(tokenizer, first: str | None = None, then: str = "#### 12"):
    """A `generate` for AgentLoop: the first turn writes `first` (a tool call by default), later turns `then`."""
    first = _call("7 + 5") if first is None else first
    eos = tokenizer.eos_token_id

    def generate(prompt_ids, per_prompt, max_new):
        counts = [per_prompt] * len(prompt_ids) if isinstance(per_prompt, int) else per_prompt
        out = []
        for ids, count in zip(prompt_ids, counts):
            seen_tool = "<|im_start|>tool" in tokenizer.decode(ids)
            text = then if seen_tool else first
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            out += [(tokens[:max_new], len(tokens) <= max_new)] * count
        return out

    return generate


PROMPT = [{"role": "user", "content": "Mia has 7 apples and buys 5 more. How many?"}]


# ---- schemas, parsing, the runner ---------------------------------------------------------------------------------
def test_schemas_and_parsing():
    (schema,) = tool_schemas([calculator])
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    with pytest.raises(ValueError, match="cannot be described"):
        tool_schemas([lambda x: x])
    calls = parse_tool_calls("sure " + _call("2*3") + ' <tool_call>{"name": "x", "arguments": {bad</tool_call>')
    assert calls[0] == ToolCall("calculator", {"expression": "2*3"})
    assert calls[1].error is not None and "JSON" in calls[1].error
    assert parse_tool_calls("no calls here") == []
    string_arguments = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert parse_tool_calls(string_arguments)[0].arguments == {"a": 1}


def test_faults_become_messages_and_async_tools_run_concurrently(capsys):
    runner = ToolRunner(timeout=0.5)
    tools = {f.__name__: f for f in (calculator, slow_add, broken, hangs)}
    jobs = [(ToolCall("calculator", {"expression": "6 * 7"}), tools),
            (ToolCall("broken", {"x": 1}), tools),
            (ToolCall("hangs", {"x": 1}), tools),
            (ToolCall("nope", {}), tools),
            (ToolCall("calculator", {"wrong": 1}), tools),
            (ToolCall("", {}, "the tool call is not valid JSON"), tools)]
    jobs += [(ToolCall("slow_add", {"a": i, "b": 1}), tools) for i in range(4)]
    start = time.perf_counter()
    results = runner.run(jobs)
    elapsed = time.perf_counter() - start
    assert results[0].content == "42" and not results[0].failed
    assert results[1].failed and "the tool is broken" in results[1].content
    assert results[2].failed and "timed out" in results[2].content
    assert results[3].failed and "unknown tool 'nope'" in results[3].content
    assert results[4].failed and "TypeError" in results[4].content
    assert results[5].failed and "JSON" in results[5].content
    assert [r.content for r in results[6:]] == ["1", "2", "3", "4"]
    assert elapsed < 1.1  # four 0.3 s async calls and a 0.5 s timeout ran side by side
    assert "noisy tool output" in runner.captured
    assert "noisy" not in capsys.readouterr().out


# ---- the multi-turn record ----------------------------------------------------------------------------------------
def test_multi_turn_rollout_masks_tool_results(tokenizer):
    loop = AgentLoop(tokenizer, [calculator], max_iterations=3)
    rollout = loop.run([{"prompt": PROMPT}] * 2, scripted(tokenizer), max_completion_length=200)
    ids, mask, loss = rollout.completion_ids[0], rollout.completion_mask[0], rollout.loss_mask[0]
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    trained = tokenizer.decode(ids[:n][loss[:n].bool()])
    context = tokenizer.decode(ids[:n][~loss[:n].bool()])
    assert "calculator" in trained and "#### 12" in trained  # both model turns are trained
    assert "12" in context and "<|im_start|>tool" in context and "calculator" not in context
    # the tool result sits between the two model turns, as one masked run
    runs = torch.diff(loss[:n]).abs().sum()
    assert int(runs) == 2
    roles = [m["role"] for m in rollout.completions[0]]
    assert roles == ["assistant", "tool", "assistant"]
    assert rollout.completions[0][1]["content"] == "12"
    assert rollout.completions[0][0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert rollout.tool_calls.tolist() == [1.0, 1.0] and rollout.turns.tolist() == [2.0, 2.0]
    assert not rollout.is_truncated.any()
    # the whole completion region is what the chat template renders for the same conversation
    full = tokenizer.apply_chat_template(PROMPT + rollout.completions[0], tools=loop.schemas[None], tokenize=False)
    assert full.startswith(tokenizer.decode(torch.cat([rollout.prompt_ids[0][rollout.prompt_mask[0].bool()],
                                                       ids[:n]])))


def test_limits_iterations_budget_and_faulty_calls(tokenizer):
    loop = AgentLoop(tokenizer, [calculator], max_iterations=0)
    rollout = loop.run([{"prompt": PROMPT}], scripted(tokenizer), max_completion_length=200)
    assert rollout.tool_calls.tolist() == [0.0] and rollout.turns.tolist() == [1.0]
    loop = AgentLoop(tokenizer, [calculator], max_iterations=5)  # the model keeps calling: 5 rounds, then stop
    rollout = loop.run([{"prompt": PROMPT}], scripted(tokenizer, then=_call("1 + 1")), max_completion_length=2000)
    assert rollout.tool_calls.tolist() == [5.0] and rollout.turns.tolist() == [6.0]
    short = loop.run([{"prompt": PROMPT}], scripted(tokenizer), max_completion_length=30)  # no room for a reply
    assert short.is_truncated.all() and short.completion_mask.sum() <= 30
    bad = loop.run([{"prompt": PROMPT}], scripted(tokenizer, first='<tool_call>{"name": "calculator"'),
                   max_completion_length=200)
    assert bad.tool_failures.tolist() == [1.0] and "Error" in bad.completions[0][1]["content"]


def test_template_without_tools_is_refused():
    with pytest.raises(ValueError, match="chat_template_path='posttrain/chatml-tools'"):
        AgentLoop(load_tokenizer(MODEL), [calculator])


# ---- training on the interaction ----------------------------------------------------------------------------------
def _args(tmp_path, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=96, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                seed=0, chat_template_path=TOOLS_TEMPLATE, max_tool_calling_iterations=2, log_completions=True)
    base.update(kw)
    return cls(**base)


def _dataset(n=4, **columns):
    rows = {"prompt": [PROMPT] * n, "answer": ["12"] * n, **columns}
    return datasets.Dataset.from_dict(rows)


def _scripted_trainer(trainer, **kw):
    trainer._generate_turn = scripted(trainer.processing_class, **kw)
    return trainer


def _multi_turn_batch(trainer):
    rows = [dict(r) for r in _dataset(2)]
    rows = [r for r in rows for _ in range(2)]
    rollout = trainer.make_rollout(rows)
    batch = trainer.rollout_tensors(rollout)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return rollout, batch


def test_tool_results_get_no_gradient_and_loss_is_the_sum_over_turns(tmp_path):
    trainer = _scripted_trainer(GRPOTrainer(MODEL, reward_funcs="accuracy_reward", args=_args(tmp_path),
                                            train_dataset=_dataset(), tools=[calculator]))
    model = trainer.model
    rollout, batch = _multi_turn_batch(trainer)
    loss_mask = batch["completion_mask"]
    assert (rollout.completion_mask.sum() > loss_mask.sum())  # tool tokens are context only
    # gradient of the loss at each position's final hidden state: zero where the next token is a tool result
    grads = []
    norm = model.model.norm

    def keep(module, args, output):
        output.retain_grad()
        grads.append(output)

    handle = norm.register_forward_hook(keep)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    handle.remove()
    hidden = grads[-1]
    C = loss_mask.shape[1]
    per_position = hidden.grad.abs().sum(-1)[:, -C - 1:-1]  # position t predicts completion column t - P + 1
    tool = (rollout.completion_mask == 1) & (loss_mask == 0)
    assert per_position[tool].max() == 0
    assert (per_position[loss_mask.bool()] > 0).float().mean() > 0.95
    # the loss over the whole interaction = the sum of losses of each model turn on its own (same normaliser)
    model.zero_grad()
    counts = trainer.count_items(batch)
    with torch.no_grad():
        whole = trainer.compute_loss(model, {**batch, "num_items": counts})
        turns = 0.0
        runs = torch.diff(torch.nn.functional.pad(loss_mask, (1, 1)), dim=1)
        for k in range(2):  # model turn k of every row: the context up to its end, only its tokens trained
            starts = (runs == 1).nonzero()
            ends = (runs == -1).nonzero()
            end = int(max(ends[ends[:, 0] == i][k, 1] for i in range(4)))
            turn_mask = torch.zeros_like(loss_mask)
            for i in range(4):
                s, e = int(starts[starts[:, 0] == i][k, 1]), int(ends[ends[:, 0] == i][k, 1])
                turn_mask[i, s:e] = 1
            P = batch["input_ids"].shape[1] - C
            part = {"input_ids": batch["input_ids"][:, :P + end],
                    "attention_mask": batch["attention_mask"][:, :P + end],
                    "completion_mask": turn_mask[:, :end], "advantages": batch["advantages"], "num_items": counts}
            turns = turns + trainer.compute_loss(model, part)
    assert whole.item() == pytest.approx(turns.item(), rel=1e-5, abs=1e-7)


def test_shared_prefix_and_chunked_head_match_the_plain_forward_on_multi_turn_rows(tmp_path):
    trainer = _scripted_trainer(GRPOTrainer(MODEL, reward_funcs="accuracy_reward", args=_args(tmp_path),
                                            train_dataset=_dataset(), tools=[calculator]))
    model = trainer.model
    _, batch = _multi_turn_batch(trainer)
    C = batch["completion_mask"].shape[1]
    P = batch["input_ids"].shape[1] - C
    labels = batch["input_ids"].clone()
    labels[:, :P] = -100
    labels[:, P:][batch["completion_mask"] == 0] = -100
    plain_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
                   "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    results = []
    for chunked, shared in ((False, 0), (False, P), (True, P), (True, 0)):
        model.zero_grad()
        with lm_head_chunking(chunked):
            out = completion_logps(model, plain_batch, temperature=1.0, shared_prefix=shared)
            out["logps"].sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out["logps"][out["mask"]].detach(), grads))
    (ref_logps, ref_grads), *others = results
    assert ref_logps.numel() == int(batch["completion_mask"].sum())  # only the model's tokens carry a log-prob
    for logps, grads in others:
        torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=5e-5)
    via_trainer, _ = trainer.completion_logps(model, batch)  # the online base puts them back at their columns
    torch.testing.assert_close(via_trainer[batch["completion_mask"].bool()], ref_logps, rtol=1e-5, atol=1e-5)
    assert via_trainer[batch["completion_mask"] == 0].abs().max() == 0


@pytest.mark.parametrize("trainer_cls,config_cls", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_grpo_and_rloo_train_with_tools(tmp_path, capsys, trainer_cls, config_cls):
    def alternating(completions, **kwargs):  # identical scripted completions still get different advantages
        return [float(i % 2) for i in range(len(completions))]

    trainer = _scripted_trainer(trainer_cls(MODEL, reward_funcs=["accuracy_reward", alternating],
                                            args=_args(tmp_path, config_cls, num_iterations=2),
                                            train_dataset=_dataset(), tools=[calculator]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["tools/call_frequency"] == 1.0 and logs["tools/failure_frequency"] == 0.0
    assert logs["turns/mean"] == 2.0 and logs["rewards/accuracy_reward/mean"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    with open(tmp_path / "out" / "completions.jsonl") as f:
        row = json.loads(f.readline())
    assert [m["role"] for m in row["completion"]] == ["assistant", "tool", "assistant"] and row["tool_calls"] == 1
    assert "noisy tool output" not in capsys.readouterr().out


class Counter:
    """An environment: a counter the model increments; its reward is the final count."""

    def __init__(self):
        self.count = 0

    def reset(self, **row):
        self.count = row.get("start", 0)
        return f" (the counter starts at {self.count})"

    def increment(self, step: int) -> int:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.count += step
        return self.count

    def get_reward(self) -> float:
        return float(self.count)


class Echo(Counter):
    def reset(self, **row):
        self.count = 0

    def get_reward(self):
        return -1.0


def test_environment_factory_reward_and_selection(tmp_path):
    call = '<tool_call>{"name": "increment", "arguments": {"step": 2}}</tool_call>'
    def doubled(environments, **kwargs):  # TRL's form: a reward function reading the rollouts' environments
        return [2.0 * env.count for env in environments]

    trainer = _scripted_trainer(GRPOTrainer(MODEL, reward_funcs=doubled, args=_args(tmp_path),
                                            train_dataset=_dataset(start=[3] * 4), environment_factory=Counter),
                                first=call, then="done")
    rollout = trainer.make_rollout([dict(r) for r in _dataset(4, start=[3] * 4)])
    assert trainer.reward_runner.names == ["doubled", "Counter"]
    assert rollout.rewards.tolist() == [[10.0, 5.0]] * 4  # reset to 3, the model added 2
    assert rollout.prompts[0][-1]["content"].endswith("(the counter starts at 3)")
    trainer = _scripted_trainer(GRPOTrainer(MODEL, args=_args(tmp_path), environment_factory={"c": Counter, "e": Echo},
                                            train_dataset=_dataset(environment=["c", "c", "e", "e"])),
                                first=call, then="done")
    rollout = trainer.make_rollout([dict(r) for r in _dataset(4, environment=["c", "c", "e", "e"])])
    assert trainer.reward_runner.names == ["Counter", "Echo"]
    assert rollout.scores.tolist() == [2.0, 2.0, -1.0, -1.0]


def test_rollout_func_and_refusals(tmp_path):
    seen = {}

    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        ids = tok("a b", add_special_tokens=False)["input_ids"]
        n = len(prompts) * trainer.args.num_generations
        return {"prompt_ids": [[5, 6, 7]] * len(prompts), "completion_ids": [ids + [tok.eos_token_id]] * n,
                "logprobs": [[0.0] * (len(ids) + 1)] * n, "env_mask": [[1] + [0] * len(ids)] * n,
                "trace_id": list(range(n))}

    def reward(completions, trace_id, **kwargs):
        seen["trace_id"] = trace_id
        return [1.0] * len(completions)

    trainer = GRPOTrainer(MODEL, reward_funcs=reward, args=_args(tmp_path, chat_template_path=None),
                          train_dataset=_dataset(), rollout_func=rollout_func)
    rollout = trainer.make_rollout([dict(r) for r in _dataset(2)] * 2)
    assert seen["trace_id"] == [0, 1, 2, 3]
    assert rollout.loss_mask.sum(1).tolist() == [1] * 4 and not rollout.is_truncated.any()
    from posttrain.trainers.online_dpo import OnlineDPOTrainer

    with pytest.raises(TypeError, match="OnlineDPOTrainer does not take tools="):
        OnlineDPOTrainer(MODEL, reward_funcs=reward, train_dataset=_dataset(), tools=[calculator])
    from posttrain.configs.online_dpo import OnlineDPOConfig

    with pytest.raises(TypeError, match="GRPOTrainer, RLOOTrainer"):
        OnlineDPOConfig(max_tool_calling_iterations=2)
    with pytest.raises(ValueError, match="needs reward_funcs"):
        GRPOTrainer(MODEL, args=_args(tmp_path), train_dataset=_dataset(), tools=[calculator])


def test_cli_tools_and_environment_flags(tmp_path):
    from posttrain.cli import main

    common = ["--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-prompts", "--dataset_config",
              "conversational", "--dataset_train_split", "train[:4]", "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
              "--chat_template_path", TOOLS_TEMPLATE, "--report_to", "none", "--save_strategy", "no"]
    assert main(["grpo", *common, "--reward_funcs", "accuracy_reward", "--tools",
                 "examples/agentic_tools.py:calculator", "--output_dir", str(tmp_path / "tools")]) == 0
    assert main(["rloo", *common, "--environment_factory", "examples/agentic_tools.py:ArithmeticEnv",
                 "--output_dir", str(tmp_path / "env")]) == 0
    with open(tmp_path / "env" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert any("rewards/ArithmeticEnv/mean" in row for row in logged)
