"""Parity with TRL (skipped unless the `trl` extra is installed): same policy, a reference that differs from it,
the same batch — the first-step loss and rewards/margins of every DPO loss type TRL also has must match to 1e-4
relative. Also reward modelling. Run: pip install -e '.[parity]' && pytest tests/test_parity_trl.py"""

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from posttrain.configs.dpo import DPOConfig  # noqa: E402
from posttrain.configs.reward import RewardConfig  # noqa: E402
from posttrain.data.arith import load_builtin_dataset  # noqa: E402
from posttrain.models.builtin import builtin_model_path  # noqa: E402
from posttrain.trainers.dpo import DPOTrainer  # noqa: E402
from posttrain.trainers.reward import RewardTrainer  # noqa: E402

TRL_DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
COMMON = dict(max_steps=1, per_device_train_batch_size=8, learning_rate=1e-9, logging_steps=1, report_to="none",
              save_strategy="no", seed=0, bf16=False, disable_tqdm=True)


@pytest.fixture(scope="module")
def models():
    path = builtin_model_path("posttrain/tiny")
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # a reference that differs from the policy makes the comparison a real test
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return path, policy, ref


def _first_log(trainer):
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("loss_type", TRL_DPO_LOSSES)
def test_dpo_first_step_matches_trl(tmp_path, models, loss_type):
    path, policy, ref = models
    data = load_builtin_dataset("posttrain/arith-pref", split="train[:8]")
    tok = AutoTokenizer.from_pretrained(path)
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    ours = _first_log(DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), processing_class=tok,
                                 args=DPOConfig(output_dir=str(tmp_path / "ours"), loss_type=loss_type, **extra,
                                                **COMMON), train_dataset=data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first_log(trl.DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), processing_class=tok,
                                           args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type],
                                                              gradient_checkpointing=False, **extra, **COMMON),
                                           train_dataset=data))
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])


def test_reward_first_step_matches_trl(tmp_path, models):
    path = models[0]
    data = load_builtin_dataset("posttrain/arith-pref-implicit", split="train[:8]")
    tok = AutoTokenizer.from_pretrained(path)

    def model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)

    ours = _first_log(RewardTrainer(model(), processing_class=tok, train_dataset=data,
                                    args=RewardConfig(output_dir=str(tmp_path / "ours"), **COMMON)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first_log(trl.RewardTrainer(model(), processing_class=tok, train_dataset=data,
                                              args=trl.RewardConfig(output_dir=str(tmp_path / "trl"),
                                                                    gradient_checkpointing=False, **COMMON)))
    for key in ("loss", "accuracy", "margin"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_first_step_matches_trl(tmp_path, models, loss_type):
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer

    from posttrain.configs.cpo import CPOConfig
    from posttrain.trainers.cpo import CPOTrainer

    path, policy, _ = models
    data = load_builtin_dataset("posttrain/arith-pref", split="train[:8]")
    tok = AutoTokenizer.from_pretrained(path)
    extra = {"alpha": 0.3} if loss_type == "alphapo" else {}
    ours = _first_log(CPOTrainer(copy.deepcopy(policy), processing_class=tok, train_dataset=data,
                                 args=CPOConfig(output_dir=str(tmp_path / "ours"), loss_type=loss_type, **extra,
                                                **COMMON)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first_log(TRLCPOTrainer(copy.deepcopy(policy), processing_class=tok, train_dataset=data,
                                          args=TRLCPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type,
                                                            gradient_checkpointing=False, **extra, **COMMON)))
    keys = ("loss", "rewards/margins", "rewards/chosen") + (("nll_loss",) if theirs["nll_loss"] else ())
    for key in keys:  # TRL logs nll_loss 0 when cpo_alpha is 0 (alphapo); we log the NLL whatever its weight
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])


def test_orpo_first_step_matches_trl(tmp_path, models):
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    from posttrain.configs.cpo import ORPOConfig
    from posttrain.trainers.cpo import ORPOTrainer

    path, policy, _ = models
    data = load_builtin_dataset("posttrain/arith-pref", split="train[:8]")
    tok = AutoTokenizer.from_pretrained(path)
    ours = _first_log(ORPOTrainer(copy.deepcopy(policy), processing_class=tok, train_dataset=data,
                                  args=ORPOConfig(output_dir=str(tmp_path / "ours"), **COMMON)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first_log(TRLORPOTrainer(copy.deepcopy(policy), processing_class=tok, train_dataset=data,
                                           args=TRLORPOConfig(output_dir=str(tmp_path / "trl"),
                                                              gradient_checkpointing=False, **COMMON)))
    for key in ("log_odds_ratio", "log_odds_chosen", "rewards/margins", "rewards/chosen"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])
    # TRL's NLL spans prompt + chosen, ours (the ORPO paper's) the chosen completion: compare the odds-ratio part
    assert ours["loss"] - ours["nll_loss"] == pytest.approx(theirs["loss"] - theirs["nll_loss"], rel=1e-4)
