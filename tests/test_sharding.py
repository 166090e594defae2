"""Frozen models under DeepSpeed, against a stand-in `deepspeed` module and a stand-in accelerator (the real engines
run in tests/test_sharded.py, on CPU processes, where DeepSpeed is installed): `prepare_frozen` hands `deepspeed.initialize` the run's
config without optimizer or scheduler (ZeRO-3 kept, ZeRO-1/2 → stage 0), and PPO's reference and an online
trainer's reward models go through it — scoring and reference log-probs then run through the returned wrapper,
whose parameters are placeholders as under ZeRO-3. PPO's critic is trained and stays in the policy's container.
Not a test of DeepSpeed itself."""

import importlib.machinery
import math
import sys
import types

import pytest
import torch
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.configs.ppo import PPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.models import sharding
from posttrain.models.builtin import builtin_model_path
from posttrain.models.value import PolicyAndValue
from posttrain.rewards.reward_model import RewardModelScorer
from posttrain.trainers.ppo import PPOTrainer

MODEL = "posttrain/tiny"


class _Engine(torch.nn.Module):
    """Stands in for a DeepSpeed inference engine: forwards to `module`; its parameters are empty placeholders on
    the meta device, as partitioned ZeRO-3 parameters say nothing about where the model computes."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        for _ in self.module.parameters(recurse):
            yield torch.empty(0, device="meta")


def _ds_config(stage: int) -> dict:
    return {"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupLR"},
            "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"}},
            "bf16": {"enabled": "auto"}}


@pytest.fixture()
def fake_deepspeed(monkeypatch):
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        return _Engine(kwargs["model"]), None, None, None

    module = types.ModuleType("deepspeed")
    module.initialize = initialize
    # a spec, but no installed distribution: accelerate's and transformers' availability checks still say "no" --
    # unless the real DeepSpeed is installed, and then accelerate's unwrapping looks up the engine class here
    module.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    module.DeepSpeedEngine = _Engine
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return calls


def _accelerator(stage: int):
    plugin = types.SimpleNamespace(deepspeed_config=_ds_config(stage))
    return types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, device=torch.device("cpu"),
                                 state=types.SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_prepare_frozen_initialises_deepspeed_without_optimizer(fake_deepspeed, stage):
    accelerator = _accelerator(stage)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_path(MODEL))
    args = types.SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, bf16=True, fp16=False,
                                 device=torch.device("cpu"))
    engine = sharding.prepare_frozen(accelerator, model, args)
    (call,) = fake_deepspeed
    assert isinstance(engine, _Engine) and engine.module is model and not engine.training
    assert set(call) == {"model", "config"}  # no optimizer, no model_parameters
    config = call["config"]
    assert "optimizer" not in config and "scheduler" not in config and "train_batch_size" not in config
    assert config["zero_optimization"]["stage"] == (3 if stage == 3 else 0)  # ZeRO-1/2 shard optimizer state only
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"]["enabled"] is True
    assert accelerator.state.deepspeed_plugin.deepspeed_config == _ds_config(stage)  # the run's config untouched


def _unique_chars(completions, **kwargs):
    return [float(len(set(c))) / 10 for c in completions]


@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_reference_and_reward_model_go_through_deepspeed(fake_deepspeed, monkeypatch, tmp_path, stage):
    accelerator = _accelerator(stage)
    real = sharding.prepare_frozen
    # the trainer runs on the CPU; only the frozen models see the DeepSpeed accelerator
    monkeypatch.setattr(sharding, "prepare_frozen", lambda _accelerator, model, args: real(accelerator, model, args))
    reward_model = AutoModelForSequenceClassification.from_pretrained(builtin_model_path(MODEL), num_labels=1)
    plain_reward_model = AutoModelForSequenceClassification.from_pretrained(builtin_model_path(MODEL), num_labels=1)
    plain_reward_model.score.load_state_dict(reward_model.score.state_dict())
    args = PPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_mini_batches=1,
                     num_ppo_epochs=1, max_completion_length=8, report_to="none", save_strategy="no", seed=0,
                     logging_steps=1, disable_tqdm=True)
    trainer = PPOTrainer(MODEL, reward_funcs=[_unique_chars], reward_model=reward_model, args=args,
                         train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:4]"))
    initialised = [call["model"] for call in fake_deepspeed]
    assert len(initialised) == 2 and initialised[0] is reward_model  # the reward model, then the reference copy
    assert isinstance(trainer.ref_model, _Engine) and trainer.ref_model.module is initialised[1]
    assert not any(p.requires_grad for p in trainer.ref_model.module.parameters())
    for call in fake_deepspeed:
        assert set(call) == {"model", "config"} and "optimizer" not in call["config"]
        assert call["config"]["zero_optimization"]["stage"] == (3 if stage == 3 else 0)
    # the critic is trained: it is in the policy's container (which the Trainer prepares), not a frozen engine
    assert isinstance(trainer.model, PolicyAndValue)
    assert all(m is not trainer.model.value_model for m in initialised)
    (scorer_model,) = trainer.reward_runner.reward_models
    assert isinstance(scorer_model, _Engine) and scorer_model.module is reward_model

    prompts, completions = ["1 + 2 =", "3 * 4 ="], [" 3", " 12 and more"]
    rewards = trainer.reward_runner(prompts, completions)
    plain = RewardModelScorer(plain_reward_model, trainer.processing_class)
    assert rewards.shape == (2, 2) and torch.isfinite(rewards).all()
    assert torch.allclose(rewards[:, 1], torch.tensor(plain(prompts, completions)), atol=1e-5)

    if stage == 3:  # one PPO step: reference log-probs and reward-model scores through the wrappers
        trainer.train()
        log = trainer.state.log_history[0]
        assert math.isfinite(log["loss"]) and math.isfinite(log[f"rewards/{trainer.reward_runner.names[1]}/mean"])
        assert log["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy
