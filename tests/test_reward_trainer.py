"""RewardTrainer: a sequence classifier from a causal-LM name, Bradley–Terry with margins, filtering of
over-long pairs, metrics, and scoring as the guide's get_reward_score does."""

import math

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.configs.reward import RewardConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path
from posttrain.trainers.reward import RewardTrainer

MODEL = "posttrain/tiny"


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", seed=0)
    base.update(kw)
    return RewardConfig(**base)


def _data(name="posttrain/arith-pref-implicit", n=16):
    return load_builtin_dataset(name, split=f"train[:{n}]")


@pytest.mark.parametrize("name", ["posttrain/arith-pref-implicit", "posttrain/arith-pref"])
def test_trains_from_causal_lm_name(tmp_path, name):
    trainer = RewardTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(name))
    assert trainer.model.config.num_labels == 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"])
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
        assert key in logs, key
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_margin_and_centering_change_the_loss(tmp_path):
    data = _data()
    plain = RewardTrainer(MODEL, args=_args(tmp_path / "a", max_steps=1), train_dataset=data)
    plain.train()
    with_margin = RewardTrainer(MODEL, args=_args(tmp_path / "b", max_steps=1, center_rewards_coefficient=0.1),
                                train_dataset=data.add_column("margin", [1.0] * len(data)))
    with_margin.train()
    assert with_margin.state.log_history[0]["loss"] > plain.state.log_history[0]["loss"]


def test_over_long_pairs_are_filtered(tmp_path):
    trainer = RewardTrainer(MODEL, args=_args(tmp_path, max_length=44), train_dataset=_data())
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
               for r in trainer.train_dataset]
    assert 0 < len(lengths) < 16 and max(lengths) <= 44
    with pytest.raises(ValueError, match="Every train example was dropped"):
        RewardTrainer(MODEL, args=_args(tmp_path, max_length=5), train_dataset=_data())


def test_rejects_multi_label_model(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(builtin_model_path(MODEL), num_labels=3)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(model, args=_args(tmp_path), train_dataset=_data())


def test_guide_flow_and_get_reward_score(tmp_path):
    path = builtin_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = _data()
    training_args = RewardConfig(output_dir=str(tmp_path / "reward-model"), num_train_epochs=1,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=4, learning_rate=1e-5,
                                 max_length=1024, remove_unused_columns=False, report_to="none")
    trainer = RewardTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(training_args.output_dir)

    def get_reward_score(text, model, tokenizer):
        inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=1024)
        with torch.no_grad():
            outputs = model(**inputs)
            score = outputs.logits.item()
        return score

    loaded = AutoModelForSequenceClassification.from_pretrained(training_args.output_dir)
    score = get_reward_score("Question: 2 + 2?\nAnswer: 2 + 2 = 4\n#### 4", loaded, tokenizer)
    assert math.isfinite(score)


def test_wrong_columns(tmp_path):
    bad = datasets.Dataset.from_list([{"good": "a", "bad": "b"}] * 4)
    with pytest.raises(ValueError, match="'chosen' \\+ 'rejected'"):
        RewardTrainer(MODEL, args=_args(tmp_path), train_dataset=bad)
