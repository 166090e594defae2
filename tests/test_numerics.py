"""Non-finite losses and gradients: the update is skipped (no weight changes), counted (`nonfinite_skipped`) and,
after max_nonfinite_steps in a row, the run stops with a one-line error and the last checkpoint intact; weights
with NaN are never saved."""

import math
import os

import pytest
import torch
from killable_run import build_trainer, losses
from transformers import TrainerCallback

from posttrain import SFTConfig
from posttrain.errors import NonFiniteError
from posttrain.trainers import checkpoints
from posttrain.trainers.numerics import first_nonfinite_parameter


class _Snapshots(TrainerCallback):
    """Parameters after every optimizer step, by step."""

    def __init__(self):
        self.params = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = [p.detach().clone() for p in model.parameters()]


def _poison(trainer, loss_steps=(), grad_steps=()):
    """Make the loss NaN at the given (1-based) steps, or only the gradients (via a hook) at others."""
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        step = trainer.state.global_step + 1
        if step in loss_steps:
            loss = loss * float("nan")
        if step in grad_steps:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    trainer.compute_loss = poisoned


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    trainer = build_trainer("sft", str(tmp_path / "out"), max_steps=5, save_strategy="no")
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    _poison(trainer, loss_steps=(2,), grad_steps=(3,))
    trainer.train()
    assert _same(snaps.params[1], snaps.params[2]) and _same(snaps.params[2], snaps.params[3])  # skipped
    assert not _same(snaps.params[3], snaps.params[4])  # training goes on
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "nonfinite_skipped" not in logs[0]
    assert [h["nonfinite_skipped"] for h in logs[1:]] == [1, 2, 2, 2]
    assert all(math.isfinite(h["loss"]) for h in logs)  # transformers' logging_nan_inf_filter
    assert first_nonfinite_parameter(trainer.model) is None
    trainer.save_model(str(tmp_path / "final"))  # finite weights save fine


def test_too_many_nonfinite_steps_stop_the_run_with_the_checkpoint_intact(tmp_path):
    out = tmp_path / "out"
    trainer = build_trainer("sft", str(out), max_steps=8, save_steps=2, max_nonfinite_steps=3)
    _poison(trainer, loss_steps=range(4, 9))
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row had a non-finite loss \(up to step 6\); "
                       r"the last checkpoint is .*checkpoint-4; lower learning_rate"):
        trainer.train()
    assert checkpoints.latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert sorted(os.listdir(out)) == [n for n in sorted(os.listdir(out)) if not n.startswith("incomplete-")]
    saved = build_trainer("sft", str(tmp_path / "check"), max_steps=8)
    saved._load_from_checkpoint(str(out / "checkpoint-4"))
    assert _same(list(saved.model.parameters()), list(trainer.model.parameters()))  # nothing moved after step 4


def test_nan_weights_are_never_saved(tmp_path):
    trainer = build_trainer("sft", str(tmp_path / "out"), max_steps=1, save_strategy="no")
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^refusing to save the model to .*: parameter '.*' holds NaN or inf; "):
        trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "model.safetensors")


def test_max_nonfinite_steps_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"max_nonfinite_steps must be >= 0 \(0 = never stop\), got -1"):
        SFTConfig(output_dir=str(tmp_path), max_nonfinite_steps=-1)
    assert SFTConfig(output_dir=str(tmp_path)).max_nonfinite_steps == 5


def test_zero_means_skip_but_never_stop(tmp_path):
    trainer = build_trainer("sft", str(tmp_path / "out"), max_steps=4, save_strategy="no", max_nonfinite_steps=0)
    _poison(trainer, loss_steps=(1, 2, 3, 4))
    trainer.train()
    assert trainer.state.log_history[-2]["nonfinite_skipped"] == 4
    assert losses(trainer)


def _sometimes_nan(completions, **kwargs):
    return [float("nan")] + [float(len(set(c))) for c in completions[1:]]


def test_grpo_trains_through_nan_rewards_and_logs_their_share(tmp_path):
    from posttrain import GRPOConfig, GRPOTrainer
    from posttrain.data.arith import load_builtin_dataset

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, logging_steps=1, report_to="none", save_strategy="no", seed=0)
    trainer = GRPOTrainer("posttrain/tiny", reward_funcs=_sometimes_nan, args=args,
                          train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["rewards/_sometimes_nan/nan_frac"] for h in logs] == [0.25, 0.25]  # one of 4 completions per batch
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward"]) for h in logs)
    assert "nonfinite_skipped" not in logs[-1]
