"""DPOTrainer on the built-in tiny model: every loss type trains, reference handling (copy, explicit, PEFT
adapter-off, precomputed, TR-DPO sync), metrics, global normalisation, the guide's call forms."""

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.configs.dpo import DPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.losses.preference import DPO_LOSSES
from posttrain.models.builtin import builtin_model_path
from posttrain.trainers.dpo import DPOTrainer

MODEL = "posttrain/tiny"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", max_length=96, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def _data(name="posttrain/arith-pref", config=None, n=16):
    return load_builtin_dataset(name, config, split=f"train[:{n}]")


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type_trains(tmp_path, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair") else {}
    trainer = DPOTrainer(MODEL, args=_args(tmp_path, loss_type=loss_type, **extra), train_dataset=_data())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"])
    for key in METRICS:
        assert key in logs, key
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed == len(before)


def test_first_step_is_log2_when_policy_equals_reference(tmp_path):
    trainer = DPOTrainer(MODEL, args=_args(tmp_path, max_steps=1), train_dataset=_data())
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name,config", [("posttrain/arith-pref", "conversational"),
                                         ("posttrain/arith-pref-implicit", "standard"),
                                         ("posttrain/arith-pref-implicit", "conversational")])
def test_dataset_forms(tmp_path, name, config):
    trainer = DPOTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(name, config))
    row = trainer.train_dataset[0]
    tok = trainer.processing_class
    assert "####" in tok.decode(row["chosen_ids"]) and "####" not in tok.decode(row["prompt_ids"])
    trainer.train()


def test_multi_loss_and_variants(tmp_path):
    args = _args(tmp_path, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                 f_divergence_type="js_divergence", use_weighting=True, ld_alpha=0.5)
    trainer = DPOTrainer(MODEL, args=args, train_dataset=_data())
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def step(tag, **kw):
        args = _args(tmp_path / tag, max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                     max_grad_norm=1e9, **kw)
        trainer = DPOTrainer(MODEL, args=args, train_dataset=_data(n=8))
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    a = step("a", per_device_train_batch_size=8)
    b = step("b", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_explicit_reference_differs_from_policy(tmp_path):
    path = builtin_model_path(MODEL)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path, max_steps=1), train_dataset=_data())
    trainer.train()
    assert trainer.state.log_history[0]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert trainer.ref_model is ref


def test_peft_uses_adapter_disabled_base_as_reference(tmp_path):
    from peft import LoraConfig

    trainer = DPOTrainer(MODEL, args=_args(tmp_path, max_steps=1), train_dataset=_data(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.ref_model is None
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_precompute_reference_logps_matches_live_reference(tmp_path):
    live = DPOTrainer(MODEL, args=_args(tmp_path / "live", max_steps=3), train_dataset=_data())
    live.train()
    pre = DPOTrainer(MODEL, args=_args(tmp_path / "pre", max_steps=3, precompute_ref_log_probs=True),
                     train_dataset=_data())
    assert pre.ref_model is None and "ref_chosen_logps" in pre.train_dataset.column_names
    pre.train()
    for a, b in zip(live.state.log_history[:3], pre.state.log_history[:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    again = DPOTrainer(MODEL, args=_args(tmp_path / "again", precompute_ref_log_probs=True), train_dataset=_data())
    assert again.train_dataset["ref_chosen_logps"] == pre.train_dataset["ref_chosen_logps"]  # from the cache


def test_sync_ref_model_moves_reference(tmp_path):
    trainer = DPOTrainer(MODEL, args=_args(tmp_path, max_steps=2, sync_ref_model=True, ref_model_sync_steps=1,
                                           ref_model_mixup_alpha=0.5), train_dataset=_data())
    before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.ref_model.named_parameters())


def test_eval_metrics(tmp_path):
    trainer = DPOTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(),
                         eval_dataset=load_builtin_dataset("posttrain/arith-pref", split="test[:8]"))
    metrics = trainer.evaluate()
    for key in METRICS:
        assert f"eval_{key}" in metrics


def test_guide_call_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = builtin_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path)
    dataset = _data()
    with warnings.catch_warnings(record=True):
        trainer = DPOTrainer(model=model, ref_model=ref_model, beta=0.1, train_dataset=dataset, max_steps=1)
    assert trainer.args.beta == 0.1 and trainer.processing_class is not None
    trainer.train()
    training_args = DPOConfig(output_dir="./dpo-model", num_train_epochs=1, per_device_train_batch_size=2,
                              gradient_accumulation_steps=4, learning_rate=5e-7, beta=0.1, max_length=1024,
                              max_prompt_length=512, max_steps=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = DPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()


def test_bad_config_values():
    with pytest.raises(ValueError, match="Unknown loss_type 'sigmod'"):
        DPOConfig(output_dir="x", loss_type="sigmod")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(output_dir="x", beta=-1)
    with pytest.raises(ValueError, match="loss_weights has 1"):
        DPOConfig(output_dir="x", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
