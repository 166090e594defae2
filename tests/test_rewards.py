"""Rewards: the protocol as the runner applies it, error messages, path/name resolution, built-in values, RMs."""

import asyncio
import math
import pickle
import sys
import time

import pytest
import torch

from posttrain.errors import UserError
from posttrain.rewards import (
    BUILTIN_REWARDS,
    RewardRunner,
    accuracy_reward,
    format_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    length_reward,
    repetition_penalty_reward,
    think_format_reward,
    weighted_sum,
)
from posttrain.rewards.protocol import completion_text

PROMPTS = ["Q1", "Q1", "Q2"]
COMPLETIONS = [" 7 + 5 = 12\n#### 12", " 7 + 5 = 13\n#### 13", " \\boxed{4}"]
IDS = [[1, 2, 3], [4, 5], [6]]


def _conv(text):
    return [{"role": "assistant", "content": text}]


# ---- protocol ----------------------------------------------------------------------------------------------------

def test_protocol_keywords_columns_and_trainer_state():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer,
                    state=trainer_state, extra=kwargs)
        completions.append("mutation must not leak")
        return [float(len(ids)) for ids in completion_ids]

    def second(completions, **kwargs):
        return [float(len(completions))] * 3

    state = object()
    rewards = RewardRunner([spy, second])(PROMPTS, COMPLETIONS, IDS, {"answer": ["12", "12", "4"], "task": ["m"] * 3},
                                          trainer_state=state)
    assert rewards.dtype == torch.float32 and rewards.shape == (3, 2)
    assert rewards[:, 0].tolist() == [3.0, 2.0, 1.0] and rewards[:, 1].tolist() == [3.0] * 3
    assert seen["prompts"] == PROMPTS and seen["answer"] == ["12", "12", "4"] and seen["state"] is state
    assert seen["extra"]["task"] == ["m"] * 3


def test_sync_and_async_run_concurrently_and_keep_order():
    async def slow_a(completions, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0] * len(completions)

    async def slow_b(completions, **kwargs):
        await asyncio.sleep(0.3)
        return [2.0] * len(completions)

    def sync(completions, **kwargs):
        return [3.0] * len(completions)

    def wrapped(**kwargs):  # a plain function that hands back a coroutine is awaited too
        return slow_a(**kwargs)

    runner = RewardRunner([slow_a, sync, slow_b, wrapped])
    start = time.perf_counter()
    rewards = runner(PROMPTS, COMPLETIONS, IDS)
    assert time.perf_counter() - start < 0.9  # all three overlap: ~0.3 s, not 0.9 s in sequence
    assert rewards[0].tolist() == [1.0, 3.0, 2.0, 1.0]
    assert runner.names == ["slow_a", "sync", "slow_b", "wrapped"]


def test_async_inside_running_event_loop():
    async def reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5] * len(completions)

    runner = RewardRunner(reward)

    async def notebook_cell():  # as in Jupyter: the calling thread already runs a loop
        return runner(PROMPTS, COMPLETIONS, IDS)

    assert asyncio.run(notebook_cell()).flatten().tolist() == [0.5] * 3


def test_none_becomes_nan_and_weighted_nansum():
    def maybe(completions, **kwargs):
        return [1.0, None, None]

    def other(completions, **kwargs):
        return [2.0, 4.0, None]

    runner = RewardRunner([maybe, other], reward_weights=[0.5, 2.0])
    rewards = runner(PROMPTS, COMPLETIONS, IDS)
    assert math.isnan(rewards[1, 0]) and math.isnan(rewards[2, 1])
    total = runner.weighted_sum(rewards)
    assert total[:2].tolist() == [4.5, 8.0]
    assert math.isnan(total[2])  # every function said None
    assert torch.equal(weighted_sum(rewards, torch.tensor([0.5, 2.0])).nan_to_num(-1), total.nan_to_num(-1))


def test_some_nan_is_treated_like_none_counted_and_warned_once(caplog):
    calls = []

    def flaky(completions, **kwargs):
        calls.append(1)
        return [1.0, float("nan"), None]

    runner = RewardRunner([flaky, "format_reward"])
    with caplog.at_level("WARNING", logger="posttrain.rewards.runner"):
        first = runner(PROMPTS, COMPLETIONS, IDS)
        second = runner(PROMPTS, COMPLETIONS, IDS)
    assert first[0, 0] == 1.0 and math.isnan(first[1, 0]) and math.isnan(first[2, 0])
    assert torch.equal(first.nan_to_num(-7), second.nan_to_num(-7))
    assert runner.last_nan_counts == [1, 0] and runner.nan_totals == [2, 0]  # None is not counted as NaN
    warnings = [r.getMessage() for r in caplog.records if "returned NaN" in r.getMessage()]
    assert warnings == ["reward function 'flaky' returned NaN for 1 of 3 completions; they are treated like None "
                        "(left out of the reward statistics) and counted in rewards/flaky/nan_frac. This warning is "
                        "shown once per function."]
    assert weighted_sum(first, [1.0, 1.0])[1] == first[1, 1]  # the NaN is skipped in the sum, like None


def test_names_deduplicated_and_weights_default_to_one():
    runner = RewardRunner(["accuracy_reward", "accuracy_reward", format_reward])
    assert runner.names == ["accuracy_reward", "accuracy_reward_2", "format_reward"]
    assert runner.weights == [1.0, 1.0, 1.0]


def test_weights_length_mismatch():
    with pytest.raises(ValueError, match=r"reward_weights has 3 values but there are 2 reward functions"):
        RewardRunner(["accuracy_reward", "format_reward"], reward_weights=[1.0, 2.0, 3.0])


def test_function_without_kwargs_is_refused():
    def strict(completions):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward function 'strict' must accept \*\*kwargs"):
        RewardRunner(strict)


# ---- error paths ---------------------------------------------------------------------------------------------

def _ratio(completions, **kwargs):
    return [1 / 0 for _ in completions]


def _short(completions, **kwargs):
    return [1.0]


def _nan(completions, **kwargs):
    return [float("nan")] * len(completions)


def _inf(completions, **kwargs):
    return [0.0, float("inf"), 0.0]


def _text(completions, **kwargs):
    return [0.0, "1", 0.0]


def _array(completions, **kwargs):
    return torch.zeros(len(completions))


async def _async_boom(completions, **kwargs):
    raise KeyError("missing column")


@pytest.mark.parametrize("func, error, pattern", [
    (_ratio, RuntimeError, r"^reward function '_ratio' raised ZeroDivisionError: division by zero$"),
    (_async_boom, RuntimeError, r"^reward function '_async_boom' raised KeyError: 'missing column'$"),
    (_short, ValueError, r"reward function '_short' returned 1 values for 3 completions"),
    (_nan, ValueError, r"^reward function '_nan' returned NaN for all 3 completions of this batch; fix the "
                       r"function, or return None to mark completions as 'not applicable'\.$"),
    (_inf, ValueError, r"reward function '_inf' returned inf at index 1; rewards must be finite"),
    (_text, ValueError, r"reward function '_text' returned '1' \(str\) at index 1"),
    (_array, ValueError, r"reward function '_array' returned a Tensor; it must return a list"),
])
def test_error_messages_name_the_function(func, error, pattern):
    with pytest.raises(error, match=pattern):
        RewardRunner(["format_reward", func])(PROMPTS, COMPLETIONS, IDS)


def test_returning_none_instead_of_list():
    def forgot_return(completions, **kwargs):
        pass

    with pytest.raises(ValueError, match=r"'forgot_return' returned None instead of a list.*\[None\] \* 3"):
        RewardRunner(forgot_return)(PROMPTS, COMPLETIONS, IDS)


# ---- resolution ------------------------------------------------------------------------------------------------

def test_dotted_path_from_a_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_task_rewards.py").write_text(
        "def exact(completions, answer, **kwargs):\n"
        "    return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_task_rewards", raising=False)
    for spec in ("my_task_rewards:exact", "my_task_rewards.exact", "my_task_rewards.py:exact"):
        runner = RewardRunner(spec)
        assert runner.names == ["exact"]
        assert runner(PROMPTS, COMPLETIONS, IDS, {"answer": ["12", "12", "4"]})[:, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"module 'my_task_rewards' has no attribute 'nope'"):
        RewardRunner("my_task_rewards:nope")
    with pytest.raises(ValueError, match=r"Cannot load reward function 'no_such_module_xyz:f'.*No module named"):
        RewardRunner("no_such_module_xyz:f")


def test_builtin_names_and_unknown_name():
    assert set(BUILTIN_REWARDS) >= {"accuracy_reward", "format_reward", "think_format_reward", "length_reward",
                                    "repetition_penalty_reward", "soft_overlong_punishment"}
    assert RewardRunner("accuracy_reward").funcs == [accuracy_reward]
    assert RewardRunner("trl.rewards.think_format_reward").funcs == [think_format_reward]
    with pytest.raises(ValueError, match=r"Unknown reward function 'acuracy_reward'; did you mean 'accuracy_reward'"):
        RewardRunner("acuracy_reward")
    with pytest.raises(ValueError, match=r"Unknown reward function 'no_such_reward_xyz': not a built-in reward"):
        RewardRunner("no_such_reward_xyz")  # not close to a built-in: tried as a reward model (offline: fails fast)
    with pytest.raises(ValueError, match=r"Unknown reward function 'posttrain/nope'"):
        RewardRunner("posttrain/nope")


def test_builtins_pickle():
    for func in BUILTIN_REWARDS.values():
        assert pickle.loads(pickle.dumps(func))(completions=["a b c a b c"], completion_ids=[[1] * 300]) is not None
    runner = pickle.loads(pickle.dumps(RewardRunner(["format_reward", get_soft_overlong_punishment(10, 5)])))
    assert runner.names == ["format_reward", "soft_overlong_punishment"]


# ---- built-in rewards ------------------------------------------------------------------------------------------

def test_accuracy_reward():
    completions = [" 7 + 5 = 12\n#### 12", "so \\boxed{12}.", "I think 3 then 12", "#### 13", "no number",
                   "#### 1,234", "#### 12.0"]
    answers = ["12", "12", "12", "12", "12", "1234", "12"]
    assert accuracy_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # conversational completions, gold from `solution` (GSM8K style), missing gold → None
    conv = [_conv("5 * 3 = 15\n#### 15"), _conv("#### 14"), _conv("#### 1")]
    assert accuracy_reward(conv, solution=["5 * 3 = 15\n#### 15", "#### 15", None]) == [1.0, 0.0, None]
    assert accuracy_reward(["#### 12"]) == [None]
    assert accuracy_reward(["#### 12", "#### 12"], answer=[None, "unknown"]) == [None, None]
    assert accuracy_reward(["#### -3"], answer=[-3]) == [1.0]


def test_format_reward():
    completions = ["7 + 5 = 12\n#### 12", "1,000 + 234 = 1,234\n  ####  1,234  \n", "Grace had 23 + 8 = 29 apples.\n#### 29",
                   "4 * 3 = 12\n20 + 12 = 32\n#### 32", "$3 x 4 = 12$\n#### 12", "(3 + 4) * 2 = 14\n#### 14",
                   "23 + 8 = 29 + 1 = 30\n#### 30", "1 + 1 = 2\n#### 2\n\n", "12 ÷ 4 = 3.\n#### 3"]
    assert format_reward(completions) == [1.0] * len(completions)
    assert format_reward([_conv("1 + 2 = 3\n#### 3"), _conv("3")]) == [1.0, 0.0]
    # not the format: answer on the working's line, no answer line, an answer word
    assert format_reward(["7 + 5 = 12 #### 12", "7 + 5 = 12", "\\boxed{12}", "7 + 5 = 12\n#### twelve"]) == [0.0] * 4
    # no working: a bare answer line (what GRPO from SmolLM2 collapsed to), a number or a restatement is not work
    assert format_reward(["#### 12", "12\n#### 12", "12 = 12\n#### 12", "She has 12 apples.\n#### 12"]) == [0.0] * 4
    # the answer line must state the working's last result
    assert format_reward(["7 + 5 = 13\n#### 12", "5 + 3 = 8\n8 + 2 = 10\n#### 8", "23 + 8 = 29 + 1 = 30\n#### 29"]) == [0.0] * 3
    # one final answer line only: repeated answer lines, or text after the answer, do not count
    assert format_reward(["1 + 1 = 2\n#### 2\n#### 2", "6 + 6 = 12\n#### 12\nand more",
                          "6 + 6 = 12\n#### 12\nso #### 12"]) == [0.0] * 3


def test_think_format_reward():
    completions = ["<think>7 + 5</think>\n#### 12", "<think></think>12", "<think>a</think>", "12",
                   "<think>a</think>b<think>c</think>d", "text <think>a</think> b"]
    assert think_format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert think_format_reward([_conv("<think>x</think> y")]) == [1.0]


def test_soft_overlong_punishment():
    # L_max = 10, L_cache = 4: free up to 6, then (6 − |y|) / 4, −1 beyond 10
    reward = get_soft_overlong_punishment(10, 4)
    lengths = [0, 6, 7, 8, 10, 11]
    assert reward(completion_ids=[[0] * n for n in lengths]) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    step = get_soft_overlong_punishment(10, 0)
    assert step(completion_ids=[[0] * 10, [0] * 11]) == [0.0, -1.0]
    assert BUILTIN_REWARDS["soft_overlong_punishment"](completion_ids=[[0] * 192, [0] * 224]) == [0.0, -0.5]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 11)


def test_length_and_repetition_rewards():
    assert length_reward(completion_ids=[[1] * 250, []]) == [-0.25, 0.0]
    # "a b c a b c": 3-grams abc bca cab abc → 3 unique of 4 → −0.25
    values = repetition_penalty_reward(["a b c a b c", "A b c", "one two", "x x x x x"])
    assert values == pytest.approx([-0.25, 0.0, 0.0, -2 / 3])  # "x x x x x": 1 unique 3-gram of 3
    assert repetition_penalty_reward([_conv("a b c a b c")]) == [-0.25]
    assert get_repetition_penalty_reward(ngram_size=1, max_penalty=-0.5)(["a a b b"]) == [-0.25]


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text(_conv("y")) == "y"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "z"}]}]) == "z"


# ---- reward models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model():
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.builtin import builtin_model_path
    from posttrain.models.loading import load_pretrained_model

    torch.manual_seed(0)
    return load_pretrained_model(builtin_model_path("posttrain/tiny"), AutoModelForSequenceClassification,
                                 num_labels=1)


def test_reward_model_standard_and_conversational(reward_model):
    runner = RewardRunner([reward_model, "format_reward"], reward_weights=[1.0, 0.1], batch_size=2)
    assert runner.names == ["posttrain--tiny", "format_reward"] and runner.reward_models == [reward_model]
    prompts = ["Question: 7 + 5?\nAnswer:", "Question: 2 * 3?\nAnswer:", "Question: 7 + 5?\nAnswer:"]
    completions = [" 7 + 5 = 12\n#### 12", " 2 * 3 = 6 and a longer answer\n#### 6", " 7 + 5 = 12\n#### 12"]
    rewards = runner(prompts, completions, [[1]] * 3)
    assert rewards.shape == (3, 2) and torch.isfinite(rewards).all()
    assert torch.allclose(rewards[0, 0], rewards[2, 0], atol=1e-5)  # identical texts, different batches
    assert not torch.allclose(rewards[0, 0], rewards[1, 0])

    conv_prompts = [[{"role": "user", "content": p}] for p in prompts]
    conv_rewards = runner(conv_prompts, [_conv(c) for c in completions], [[1]] * 3)
    assert conv_rewards.shape == (3, 2) and torch.isfinite(conv_rewards).all()
    assert torch.allclose(conv_rewards[0, 0], conv_rewards[2, 0], atol=1e-5)
    assert not torch.allclose(conv_rewards[0, 0], rewards[0, 0])  # the chat template changes the text scored


def test_a_language_model_is_refused_as_reward_model(reward_model, tmp_path):
    # posttrain/tiny is a causal LM: loaded as a classifier its score head would be random (random rewards)
    with pytest.raises(UserError, match=r"'posttrain/tiny' is a language model \(Qwen2ForCausalLM\), not a reward"):
        RewardRunner("posttrain/tiny", max_length=8)
    reward_model.save_pretrained(tmp_path / "rm")  # a sequence classifier saved by path is a reward model
    runner = RewardRunner(str(tmp_path / "rm"), max_length=8)
    assert runner.names == ["rm"]
    rewards = runner(["a", "b"], [" long completion " * 5, "x"], [[1], [2]])
    assert rewards.shape == (2, 1) and torch.isfinite(rewards).all()


def test_cli_reward_model_flag_adds_a_reward_model(reward_model, tmp_path):
    """`posttrain grpo --reward_funcs accuracy_reward --reward_model_name_or_path DIR` scores with both."""
    from posttrain.cli import parse_command_args
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.trainers.grpo import GRPOTrainer

    rm_dir = tmp_path / "rm"
    reward_model.save_pretrained(rm_dir)
    _, _, args = parse_command_args("grpo", ["--output_dir", str(tmp_path / "out"), "--reward_funcs",
                                             "accuracy_reward", "--reward_model_name_or_path", str(rm_dir),
                                             "--reward_weights", "1.0", "0.5", "--report_to", "none"])
    trainer = GRPOTrainer("posttrain/tiny", args=args,
                          train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    assert trainer.reward_runner.names == ["accuracy_reward", "rm"] and len(trainer.reward_runner.reward_models) == 1
    assert trainer.reward_runner.weights == [1.0, 0.5]
