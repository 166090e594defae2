"""OnlineDPOTrainer on the built-in tiny model: trains and logs TRL's metrics; at the first step policy = reference,
so the sigmoid loss is log 2 and the ipo loss (1/(2β))²; PEFT's reference is the adapter-off base; a reward model
object and TRL's legacy keywords work; pairs are ranked by score with ties left out; config errors say the fix."""

import math
import warnings

import pytest
import torch

from posttrain.configs.online_dpo import OnlineDPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.rollout.types import Rollout
from posttrain.trainers.online_dpo import OnlineDPOTrainer

MODEL = "posttrain/tiny"
METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta", "reward",
           "completions/mean_length", "timing/generate", "timing/reference", "frac_tied_pairs", "num_tokens")


def unique_chars(completions, **kwargs):
    return [float(len(set(c if isinstance(c, str) else c[-1]["content"]))) for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8,
                max_completion_length=12, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", seed=0)
    base.update(kw)
    return OnlineDPOConfig(**base)


def _prompts(n=8):
    return load_builtin_dataset("posttrain/arith-prompts", split=f"train[:{n}]")


def test_trains_logs_metrics_and_starts_at_log2(tmp_path):
    trainer = OnlineDPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, missing_eos_penalty=1.0),
                               train_dataset=_prompts())
    assert trainer.ref_model is not None and trainer.args.num_generations == 2
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    first = trainer.state.log_history[0]
    for key in METRICS:
        assert key in first, key
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference ⇒ −logσ(0)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4) and first["beta"] == pytest.approx(0.1)
    assert first["objective/scores_margin"] > 0
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed > 0.9 * len(before)


def test_ipo_peft_reference_is_adapter_off(tmp_path):
    from peft import LoraConfig

    args = _args(tmp_path, loss_type="ipo", beta=[0.1], max_steps=1, learning_rate=1e-2)
    trainer = OnlineDPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert trainer.ref_model is None  # the base with adapters disabled is the reference
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-3)  # (0 − 1/(2β))²
    # After a step the adapters moved the policy, but the reference (adapters off) is still the base model.
    batch = trainer._cycle_batches([row for row in _prompts(2) for _ in range(2)])[0]
    with torch.no_grad():
        policy, _ = trainer.completion_logps(trainer.model, batch)
    assert not torch.allclose(policy, batch["ref_logps"])
    from posttrain.models.loading import load_pretrained_model

    base = load_pretrained_model(MODEL).eval()
    with torch.no_grad():
        expected, _ = trainer.completion_logps(base, batch)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(expected[mask], batch["ref_logps"][mask], atol=1e-5)


def test_reward_model_object_and_legacy_keywords(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.builtin import builtin_model_path
    from posttrain.models.loading import load_pretrained_model

    reward_model = load_pretrained_model(builtin_model_path(MODEL), AutoModelForSequenceClassification, num_labels=1)
    policy = load_pretrained_model(MODEL)
    ref_model = load_pretrained_model(MODEL)
    with pytest.warns(FutureWarning, match="reward_funcs"):
        trainer = OnlineDPOTrainer(policy, ref_model=ref_model, reward_model=reward_model,
                                   args=_args(tmp_path, max_steps=1, beta=[0.2, 0.05], max_new_tokens=8),
                                   train_dataset=_prompts())
    assert trainer.ref_model is ref_model and not any(p.requires_grad for p in ref_model.parameters())
    assert trainer.args.max_completion_length == 8 and trainer.args.beta == [0.2, 0.05]
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["beta"] == pytest.approx(0.2) and math.isfinite(first["loss"])
    assert "rewards/posttrain--tiny/mean" in first
    with pytest.raises(ValueError, match="judge"):
        OnlineDPOTrainer(policy, judge=object(), reward_funcs=unique_chars, args=_args(tmp_path))


def test_pairs_ranked_by_score_ties_left_out(tmp_path):
    trainer = OnlineDPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, per_device_train_batch_size=2),
                               train_dataset=_prompts())
    n, width = 6, 3
    ids = torch.arange(n * width).view(n, width)
    rollout = Rollout(prompt_ids=ids[:, :1], prompt_mask=torch.ones(n, 1, dtype=torch.long),
                      completion_ids=ids[:, 1:], completion_mask=torch.ones(n, 2, dtype=torch.long),
                      is_truncated=torch.zeros(n, dtype=torch.bool), prompts=["p"] * n,
                      scores=torch.tensor([1.0, 2.0, 5.0, 3.0, 4.0, 4.0]))
    trainer.model.train()  # training splits into micro-batches of per_device_train_batch_size completions
    steps = trainer.with_item_counts(trainer.training_batches(rollout))
    parts = [part for step in steps for part in step]
    # one optimizer step per micro-batch (GA 1); 2 of the 3 pairs have a preference
    assert len(parts) == 3 and sorted(float(p["num_items"]["pair"]) for p in parts) == [0.0, 1.0, 1.0]
    by_pair = {int(p["input_ids"][0, 0]) // (2 * width): p for p in parts}
    assert by_pair[0]["scores"].tolist() == [2.0, 1.0]  # second completion scored higher: it is chosen
    assert by_pair[1]["scores"].tolist() == [5.0, 3.0] and by_pair[1]["pair_weight"].tolist() == [1.0, 0.0]
    assert by_pair[2]["pair_weight"].tolist() == [0.0, 0.0]  # a tie carries no preference


def test_missing_eos_penalty_and_bad_values(tmp_path):
    args = _args(tmp_path, missing_eos_penalty=2.0)
    trainer = OnlineDPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts())
    eos = trainer.processing_class.eos_token_id
    rollout = Rollout(prompt_ids=torch.tensor([[7], [7]]), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                      completion_ids=torch.tensor([[5, eos], [5, 6]]), completion_mask=torch.ones(2, 2),
                      is_truncated=torch.tensor([False, True]), scores=torch.tensor([3.0, 3.0]))
    trainer.training_batches(rollout)
    assert rollout.advantages.tolist() == [3.0, 1.0]  # the scores after the penalty (the completions table's column)
    for kwargs, pattern in (({"num_generations": 4}, "num_generations must be 2"),
                            ({"loss_type": "hinge"}, "Unknown loss_type 'hinge' for Online DPO; choose one of"),
                            ({"per_device_train_batch_size": 3}, "must be even"),
                            ({"beta": [0.1, 0.0]}, "beta must be > 0")):
        with pytest.raises(ValueError, match=pattern) as error:
            OnlineDPOConfig(output_dir="x", **kwargs)
        assert "\n" not in str(error.value)
    with warnings.catch_warnings(record=True):
        assert OnlineDPOConfig(output_dir="x").to_flat_dict()["beta"] == 0.1
    assert OnlineDPOConfig(output_dir="x", beta=[0.1, 0.05]).to_flat_dict()["beta"] == [0.1, 0.05]
