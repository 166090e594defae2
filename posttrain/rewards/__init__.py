"""Rewards for online training: the reward-function protocol, built-in rewards, reward models, and the runner.

    protocol.py      what a reward function is called with and must return (read this first)
    math_answers.py  grading final answers (plain numbers; LaTeX with math-verify), reasoning accuracy, cosine-scaled
    builtin.py       accuracy, format, think-format, length, repetition and DAPO overlong rewards, by name
    reward_model.py  a one-label sequence classifier wrapped as a reward function
    resolve.py       `reward_funcs` entries (callables, names, paths, model ids) → callables
    runner.py        `RewardRunner`: calls them all on a batch → (N, K) rewards; nan-aware `weighted_sum`

Not here: advantages (`algorithms/`), generation (`rollout/`), the trainers that use the runner (`trainers/`).
"""

from posttrain.rewards.builtin import (
    BUILTIN_REWARDS,
    accuracy_reward,
    format_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    length_reward,
    repetition_penalty_reward,
    think_format_reward,
)
from posttrain.rewards.math_answers import CosineScaledReward, get_cosine_scaled_reward, reasoning_accuracy_reward
from posttrain.rewards.protocol import RewardFunction, completion_text
from posttrain.rewards.runner import RewardRunner, weighted_sum

__all__ = [
    "BUILTIN_REWARDS", "CosineScaledReward", "RewardFunction", "RewardRunner", "accuracy_reward", "completion_text",
    "format_reward", "get_cosine_scaled_reward", "get_repetition_penalty_reward", "get_soft_overlong_punishment",
    "length_reward", "reasoning_accuracy_reward", "repetition_penalty_reward", "think_format_reward", "weighted_sum",
]
