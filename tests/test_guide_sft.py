"""The SFT examples of the published TRL guide (shared/seed/trl-guide.md), as written, with `trl` replaced by
`posttrain` and Hub ids by local ones (the built-in tiny model directory and small local JSON files)."""

import json
import math
import warnings

import numpy as np
import pytest

from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path


@pytest.fixture()
def local(tmp_path, monkeypatch):
    """Local stand-ins for the guide's Hub ids; the guide's relative output dirs land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    text = load_builtin_dataset("posttrain/arith-lm", split="train[:16]")
    (tmp_path / "capybara.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text["text"]))
    pc = load_builtin_dataset("posttrain/arith-sft", split="train[:16]")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in pc))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in pc.select(range(8))))
    return builtin_model_path("posttrain/tiny")


def _finished(trainer):
    return math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_basic_example(local):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain import SFTTrainer

    # 모델과 토크나이저 로드
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    dataset = load_dataset("json", data_files="capybara.jsonl", split="train")
    with warnings.catch_warnings(record=True):
        trainer = SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=dataset,
            max_seq_length=2048,
            dataset_text_field="text",  # 텍스트 필드 지정
            packing=True,  # 효율적인 패킹 사용
        )
    trainer.train()
    assert _finished(trainer) and trainer.args.bf16 is False


def test_advanced_training_arguments_example(local):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from posttrain import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    train_dataset = load_dataset("json", data_files="train.jsonl", split="train")
    eval_dataset = load_dataset("json", data_files="eval.jsonl", split="train")
    with warnings.catch_warnings(record=True):
        training_args = TrainingArguments(
            output_dir="./sft-model",
            num_train_epochs=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            warmup_steps=100,
            learning_rate=2e-5,
            logging_steps=50,
            save_steps=500,
            eval_steps=500,
            evaluation_strategy="steps",
            save_total_limit=3,
            load_best_model_at_end=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            tokenizer=tokenizer,
        )
    trainer.train()
    assert _finished(trainer) and trainer.state.global_step == 6


def test_compute_metrics_example(local):
    from datasets import load_dataset

    from posttrain import SFTTrainer

    train_dataset = load_dataset("json", data_files="train.jsonl", split="train")
    eval_dataset = load_dataset("json", data_files="eval.jsonl", split="train")

    def compute_metrics(eval_pred):
        """커스텀 평가 함수"""
        predictions, labels = eval_pred
        score = float((predictions[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100].mean())
        return {"custom_metric": score}

    trainer = SFTTrainer(
        model=local,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_custom_metric"] <= 1.0
    assert np.isclose(metrics["eval_custom_metric"], metrics["eval_mean_token_accuracy"], atol=1e-6)


def test_memory_and_hyperparameter_examples(local):
    from datasets import load_dataset
    from transformers import TrainingArguments

    from posttrain import SFTTrainer

    train_dataset = load_dataset("json", data_files="train.jsonl", split="train")
    # 그래디언트 체크포인팅 활성화
    training_args = TrainingArguments(
        gradient_checkpointing=True,
        dataloader_pin_memory=False,
        per_device_train_batch_size=1,  # 배치 크기 감소
        gradient_accumulation_steps=8,  # 누적으로 효과적 배치 크기 증가
    )
    with warnings.catch_warnings(record=True):
        trainer = SFTTrainer(model=local, args=training_args, train_dataset=train_dataset)
    trainer.train()
    assert _finished(trainer)
    conservative_args = TrainingArguments(learning_rate=1e-5, num_train_epochs=1, warmup_ratio=0.1, weight_decay=0.01)
    with warnings.catch_warnings(record=True):
        trainer = SFTTrainer(model=local, args=conservative_args, train_dataset=train_dataset)
    assert trainer.args.learning_rate == 1e-5 and trainer.args.weight_decay == 0.01
