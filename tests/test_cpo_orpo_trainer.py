"""CPOTrainer (CPO, SimPO, AlphaPO, hinge, ipo) and ORPOTrainer: reference-free preference optimisation."""

import math

import pytest
import torch

from posttrain.configs.cpo import CPOConfig, ORPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.losses.reference_free import CPO_LOSSES
from posttrain.trainers.cpo import CPOTrainer, ORPOTrainer

MODEL = "posttrain/tiny"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss")


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", max_length=96, seed=0)
    base.update(kw)
    return cls(**base)


def _data(config=None):
    return load_builtin_dataset("posttrain/arith-pref", config, split="train[:16]")


def _trains(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"])
    for key in METRICS:
        assert key in logs, key
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return logs


@pytest.mark.parametrize("loss_type", sorted(CPO_LOSSES))
def test_cpo_every_loss_type(tmp_path, loss_type):
    trainer = CPOTrainer(MODEL, args=_args(CPOConfig, tmp_path, loss_type=loss_type), train_dataset=_data())
    assert trainer.args.cpo_alpha == (0.0 if loss_type == "alphapo" else 1.0)
    _trains(trainer)


def test_simpo_without_nll_equals_its_formula_at_start(tmp_path):
    # cpo_alpha=0 (pure SimPO): first-step loss = mean −logσ(β(a_w − a_l) − γ) on the untrained model
    trainer = CPOTrainer(MODEL, args=_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, max_steps=1,
                                           beta=2.0, simpo_gamma=0.5), train_dataset=_data())
    logs = _trains(trainer)
    margin = logs["rewards/margins"]  # β(a_w − a_l) averaged over pairs
    assert logs["loss"] >= -math.log(1 / (1 + math.exp(-(margin - 0.5)))) - 1e-6  # Jensen: mean ≥ f(mean)


def test_orpo_trains_conversational(tmp_path):
    logs = _trains(ORPOTrainer(MODEL, args=_args(ORPOConfig, tmp_path), train_dataset=_data("conversational")))
    assert "log_odds_ratio" in logs and "log_odds_chosen" in logs


def test_orpo_loss_is_nll_plus_beta_odds_term(tmp_path):
    trainer = ORPOTrainer(MODEL, args=_args(ORPOConfig, tmp_path, max_steps=1, beta=0.5), train_dataset=_data())
    logs = _trains(trainer)
    assert logs["loss"] == pytest.approx(logs["nll_loss"] - 0.5 * logs["log_odds_ratio"], rel=1e-4)


def test_bad_values():
    with pytest.raises(ValueError, match="Unknown loss_type 'simp'"):
        CPOConfig(output_dir="x", loss_type="simp")
    with pytest.raises(ValueError, match="beta must be > 0"):
        ORPOConfig(output_dir="x", beta=0)


def test_orpo_and_cpo_take_model_init(tmp_path):
    from posttrain.models import loading

    built = []

    def model_init():
        built.append(loading.load_pretrained_model(MODEL))
        return built[-1]

    trainer = ORPOTrainer(model_init=model_init, args=_args(ORPOConfig, tmp_path, max_steps=1), train_dataset=_data())
    assert len(built) == 1 and trainer.model is built[0]
    _trains(trainer)
    with pytest.raises(TypeError, match="a model or a model_init, not both"):
        CPOTrainer(MODEL, model_init=model_init, args=_args(CPOConfig, tmp_path), train_dataset=_data())
