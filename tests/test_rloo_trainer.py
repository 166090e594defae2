"""RLOOTrainer: leave-one-out advantages with the KL folded into the reward, sequence-level clipped loss."""

import math

import pytest
import torch

from posttrain.configs.rloo import RLOOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.trainers.rloo import RLOOTrainer


def unique_chars(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=12, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", seed=0)
    base.update(kw)
    return RLOOConfig(**base)


def test_trains_with_kl_in_reward(tmp_path):
    data = load_builtin_dataset("posttrain/arith-prompts", split="train[:8]")
    trainer = RLOOTrainer("posttrain/tiny", reward_funcs=unique_chars, args=_args(tmp_path), train_dataset=data)
    assert trainer.ref_model is not None  # beta = 0.05 by default
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the first rollout
    for key in ("reward", "rewards/unique_chars/mean", "clip_ratio/region_mean", "completions/mean_length"):
        assert key in logs, key
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()) > 0.9 * len(before)


def test_no_reference_when_beta_zero_and_reward_clip(tmp_path):
    data = load_builtin_dataset("posttrain/arith-prompts", split="train[:8]")
    trainer = RLOOTrainer("posttrain/tiny", reward_funcs=unique_chars, train_dataset=data,
                          args=_args(tmp_path, beta=0.0, reward_clip_range=[0.0, 3.0], num_generations=4,
                                     normalize_advantages=True))
    assert trainer.ref_model is None
    trainer.train()
    assert "kl" not in trainer.state.log_history[0]


def test_bad_clip_range():
    with pytest.raises(ValueError, match="two numbers"):
        RLOOConfig(output_dir="x", reward_clip_range=[1.0])


def test_backward_in_token_slices_gives_the_same_update(tmp_path):
    """max_tokens_per_backward=1: each completion of the micro-batch of 4 is its own forward/backward, and one
    plain-SGD update equals the whole micro-batch's."""
    data = load_builtin_dataset("posttrain/arith-prompts", split="train[:2]")

    def one_step(name, **options):
        args = _args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, **options)
        trainer = RLOOTrainer("posttrain/tiny", reward_funcs=unique_chars, args=args, train_dataset=data)
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    whole, sliced, other = one_step("whole"), one_step("sliced", max_tokens_per_backward=1), one_step("other", seed=1)
    # the updates are O(5) (summed log-probs, lr 1): 3e-5 apart is float32 summation order (6e-6 relative)
    assert max(float((whole[n] - sliced[n]).abs().max()) for n in whole) < 1e-4
    assert max(float((whole[n] - other[n]).abs().max()) for n in whole) > 1.0
