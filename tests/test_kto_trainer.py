"""KTOTrainer on the built-in tiny model: both loss types train on unpaired, auto-unpaired and conversational data;
the first step's known value; the KL pairs the collator builds; reference handling (explicit, PEFT adapter-off,
precomputed, synced); a hand computation of loss and z0; global normalisation; config and data errors."""

import copy
import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.configs.kto import KTOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.data.collators import DataCollatorForUnpaired, mismatched_partners
from posttrain.data.prepare import prepare_unpaired_dataset
from posttrain.models.builtin import builtin_model_path
from posttrain.trainers.kto import KTOTrainer, desirable_balance_warning

MODEL = "posttrain/tiny"
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "entropy", "num_tokens")


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", max_length=96, seed=0)
    base.update(kw)
    return KTOConfig(**base)


def _data(name="posttrain/arith-kto", config=None, n=16):
    return load_builtin_dataset(name, config, split=f"train[:{n}]")


@pytest.mark.parametrize("name,config,loss_type", [("posttrain/arith-kto", None, "kto"),
                                                   ("posttrain/arith-kto", "conversational", "apo_zero_unpaired"),
                                                   ("posttrain/arith-pref", None, "kto")])
def test_trains_and_logs_trl_metrics(tmp_path, name, config, loss_type):
    trainer = KTOTrainer(MODEL, args=_args(tmp_path, loss_type=loss_type), train_dataset=_data(name, config))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"])
    for key in METRICS:
        assert key in logs, key
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed == len(before)


@pytest.mark.parametrize("loss_type,weights", [("kto", (1.0, 1.0)), ("kto", (2.0, 0.5)),
                                               ("apo_zero_unpaired", (1.0, 1.0))])
def test_first_step_value_when_policy_equals_reference(tmp_path, loss_type, weights):
    """Δ = 0 and z0 = 0 ⇒ every example's loss is λ·(1 − σ(0)) = λ/2 (apo: λ_D(1 − σ(0)) or λ_U·σ(0): also λ/2).
    The mean over examples is then 0.5 for equal weights."""
    data = _data(n=8)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=8, loss_type=loss_type,
                 desirable_weight=weights[0], undesirable_weight=weights[1])
    trainer = KTOTrainer(MODEL, args=args, train_dataset=data)
    trainer.train()
    logs = trainer.state.log_history[0]
    n_d = sum(data["label"])
    expected = 0.5 * (weights[0] * n_d + weights[1] * (len(data) - n_d)) / len(data)
    assert logs["loss"] == pytest.approx(expected, abs=1e-6)
    # policy and reference run on differently padded batches: equal up to float noise
    assert logs["kl"] == pytest.approx(0.0, abs=1e-5) and logs["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_paired_data_is_unpaired():
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    pairs = _data("posttrain/arith-pref-implicit", n=4)
    out = prepare_unpaired_dataset(pairs, tok, _args_ns(), "train", "KTOTrainer")
    assert len(out) == 8 and out["label"] == [True, False] * 4
    assert out[0]["prompt_ids"] == out[1]["prompt_ids"]
    assert "####" in tok.decode(out[0]["completion_ids"]) and "####" not in tok.decode(out[0]["prompt_ids"])


def _args_ns(**kw):
    base = dict(max_length=1024, max_prompt_length=None, max_completion_length=None, dataset_num_proc=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_truncation_and_drops(caplog):
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    data = _data(n=8)
    full = prepare_unpaired_dataset(data, tok, _args_ns(), "train")
    cut = prepare_unpaired_dataset(data, tok, _args_ns(max_prompt_length=5, max_completion_length=3), "train")
    for a, b in zip(full, cut):
        assert b["prompt_ids"] == a["prompt_ids"][-5:] and b["completion_ids"] == a["completion_ids"][:3]
    shortest = min(len(p) for p in full["prompt_ids"])
    with caplog.at_level(logging.WARNING):
        kept = prepare_unpaired_dataset(data, tok, _args_ns(max_length=shortest + 1), "train")
    assert all(len(p) + len(c) <= shortest + 1 for p, c in zip(kept["prompt_ids"], kept["completion_ids"]))
    assert len(kept) == sum(len(p) == shortest for p in full["prompt_ids"]) and "dropped" in caplog.text
    with pytest.raises(ValueError, match="Every train example was dropped"):
        prepare_unpaired_dataset(data, tok, _args_ns(max_length=shortest), "train")


def test_wrong_or_empty_dataset_errors():
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    with pytest.raises(ValueError, match=r"KTOTrainer expects a dataset with columns 'prompt' \+ 'completion' \+ "
                                         r"'label' or"):
        prepare_unpaired_dataset(_data("posttrain/arith-sft", n=4), tok, _args_ns(), "train", "KTOTrainer")
    with pytest.raises(ValueError, match="The train dataset is empty"):
        prepare_unpaired_dataset(_data(n=4).select([]), tok, _args_ns(), "train")


def test_collator_builds_mismatched_pairs_in_the_batch():
    examples = [{"prompt_ids": [1, 2], "completion_ids": [3], "label": True, "ref_logps": -1.0},
                {"prompt_ids": [4], "completion_ids": [5, 6], "label": False, "ref_logps": -2.0},
                {"prompt_ids": [7], "completion_ids": [8], "label": True, "ref_logps": -3.0}]
    batch = DataCollatorForUnpaired(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0],  # real rows
                                           [1, 2, 8], [4, 3, 0], [7, 5, 6]]  # prompt_i + completion_{i-1}
    assert batch["labels"][3].tolist() == [-100, -100, 8] and batch["labels"][5].tolist() == [-100, 5, 6]
    assert batch["attention_mask"][4].tolist() == [1, 1, 0]
    assert batch["label"].tolist() == [True, False, True] and batch["ref_logps"].tolist() == [-1.0, -2.0, -3.0]
    assert DataCollatorForUnpaired(pad_token_id=0, kl=False)(examples)["input_ids"].shape == (3, 3)
    assert DataCollatorForUnpaired(pad_token_id=0, max_length=2)(examples)["input_ids"].shape == (6, 2)
    # adjacent rows of one prompt (unpaired preference pairs) are never matched with their own completions
    assert mismatched_partners([[1], [1], [2], [2], [3], [3]]) == [4, 5, 0, 1, 2, 3]
    assert mismatched_partners([[1], [1]]) == [1, 0]  # nothing else to pair with: plain rotation


def test_loss_and_kl_match_a_hand_computation(tmp_path):
    """compute_loss on one collated batch against log-softmax of full logits, written out here."""
    policy, ref = _perturbed_policy_and_reference()
    args = _args(tmp_path, desirable_weight=1.5, undesirable_weight=0.7, beta=0.3)
    trainer = KTOTrainer(policy, ref_model=ref, args=args, train_dataset=_data(n=4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()

    def seq_logps(model):
        with torch.no_grad():
            logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        picked = logp[:, :-1].gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * mask).sum(-1)

    delta = seq_logps(policy) - seq_logps(ref)
    z0 = max(delta[4:].mean().item(), 0.0)
    labels = batch["label"]
    expected = torch.where(labels, 1.5 * (1 - torch.sigmoid(0.3 * (delta[:4] - z0))),
                           0.7 * (1 - torch.sigmoid(0.3 * (z0 - delta[:4])))).mean().item()
    assert z0 > 0 and trainer._metrics["train"]["kl"] == pytest.approx([z0, 1.0], rel=1e-4)
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["apo_zero_unpaired", "kto"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, loss_type):
    """Exact for apo_zero_unpaired. For kto the KL pairs depend on which examples share a micro-batch; at the first
    step policy = reference, so z0 = 0 whatever the pairs and the updates must match too."""
    def step(tag, **kw):
        args = _args(tmp_path / tag, max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                     max_grad_norm=1e9, loss_type=loss_type, **kw)
        trainer = KTOTrainer(MODEL, args=args, train_dataset=_data(n=8))
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    a = step("a", per_device_train_batch_size=8)
    b = step("b", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_peft_uses_adapter_disabled_base_as_reference(tmp_path):
    from peft import LoraConfig

    trainer = KTOTrainer(MODEL, args=_args(tmp_path, max_steps=1), train_dataset=_data(n=8),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.ref_model is None
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(0.5, abs=1e-6) and logs["kl"] == pytest.approx(0.0, abs=1e-5)


def _perturbed_policy_and_reference():
    """A policy that differs from its reference so that z0 > 0 (at policy = reference the clamp hides z0)."""
    path = builtin_model_path(MODEL)
    policy, ref = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, ref


def test_precompute_reference_logps_matches_live_reference(tmp_path):
    """A sequential sampler makes the live in-batch pairs the precomputed fixed pairs, so every step matches."""
    policy, ref = _perturbed_policy_and_reference()
    common = dict(max_steps=3, train_sampling_strategy="sequential", learning_rate=1e-5)
    live = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=_args(tmp_path / "live", **common),
                      train_dataset=_data())
    live.train()
    pre = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                     args=_args(tmp_path / "pre", precompute_ref_log_probs=True, **common), train_dataset=_data())
    assert pre.ref_model is None
    assert {"ref_logps", "ref_kl_logps", "kl_completion_ids"} <= set(pre.train_dataset.column_names)
    pre.train()
    for a, b in zip(live.state.log_history[:3], pre.state.log_history[:3]):
        for key in ("loss", "kl", "rewards/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert min(h["kl"] for h in pre.state.log_history[:3]) > 0.1  # z0 took part in the comparison
    again = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                       args=_args(tmp_path / "again", precompute_ref_log_probs=True, **common), train_dataset=_data())
    assert again.train_dataset["ref_kl_logps"] == pre.train_dataset["ref_kl_logps"]  # from the cache


def test_sync_ref_model_and_eval_metrics(tmp_path):
    trainer = KTOTrainer(MODEL, args=_args(tmp_path, sync_ref_model=True, ref_model_sync_steps=1,
                                           ref_model_mixup_alpha=0.5), train_dataset=_data(n=8),
                         eval_dataset=load_builtin_dataset("posttrain/arith-kto", split="test[:8]"))
    before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.ref_model.named_parameters())
    metrics = trainer.evaluate()
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert f"eval_{key}" in metrics


def test_legacy_call_form_and_explicit_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = builtin_model_path(MODEL)
    model, ref_model = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings(record=True):
        trainer = KTOTrainer(model=model, ref_model=ref_model, tokenizer=tokenizer, beta=0.2, train_dataset=_data(),
                             max_steps=1, per_device_train_batch_size=4)
    assert trainer.args.beta == 0.2 and trainer.ref_model is ref_model and trainer.processing_class is tokenizer
    trainer.train()


def test_desirable_balance_warning():
    assert desirable_balance_warning([True, False] * 4, 1.0, 1.0) is None
    message = desirable_balance_warning([True] * 2 + [False] * 8, 1.0, 1.0)
    assert "outside the KTO paper's recommended [1, 4/3]" in message and "desirable_weight in [4, 5.33]" in message
    assert desirable_balance_warning([True] * 2 + [False] * 8, 4.5, 1.0) is None
    # one label only: nothing to contrast (was "n_undesirable = 1", a count the data does not have)
    assert "every one of the 6 examples is desirable (label True)" in desirable_balance_warning([True] * 6, 1.0, 1.0)


def test_bad_config_values():
    with pytest.raises(ValueError, match="Unknown loss_type 'ktoo' for KTO; choose one of: kto, apo_zero_unpaired"):
        KTOConfig(output_dir="x", loss_type="ktoo")
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        KTOConfig(output_dir="x", beta=0)
    with pytest.raises(ValueError, match="undesirable_weight must be > 0, got -1"):
        KTOConfig(output_dir="x", undesirable_weight=-1)
    with pytest.raises(ValueError, match="per_device_train_batch_size must be > 1 for loss_type='kto', got 1"):
        KTOConfig(output_dir="x", per_device_train_batch_size=1)
    KTOConfig(output_dir="x", per_device_train_batch_size=1, loss_type="apo_zero_unpaired")  # no KL term: fine
    with pytest.raises(ValueError, match="precompute_ref_log_probs and sync_ref_model exclude each other"):
        KTOConfig(output_dir="x", precompute_ref_log_probs=True, sync_ref_model=True)
