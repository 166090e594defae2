"""SFTTrainer on the built-in tiny model: trains, logs TRL's metrics, normalises globally, keeps old call forms."""

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from posttrain import SFTConfig, SFTTrainer
from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path

MODEL = "posttrain/tiny"


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, report_to="none", save_strategy="no", max_length=128, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def _data(name="posttrain/arith-sft", config=None, n=32):
    return load_builtin_dataset(name, config, split=f"train[:{n}]")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_all_changed(before, model):
    for name, param in model.named_parameters():
        if name in before:
            assert not torch.equal(before[name], param.detach()), f"Parameter {name} has not changed."


@pytest.mark.parametrize("name,config", [
    ("posttrain/arith-sft", "standard"), ("posttrain/arith-sft", "conversational"),
    ("posttrain/arith-lm", "standard"), ("posttrain/arith-lm", "conversational"),
])
def test_trains_on_each_sft_dataset_type(tmp_path, name, config):
    trainer = SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(name, config))
    before = _params(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    for key in ("mean_token_accuracy", "entropy", "num_tokens", "grad_norm", "learning_rate"):
        assert key in logs[-1], key
    assert 0.0 <= logs[-1]["mean_token_accuracy"] <= 1.0
    _assert_all_changed(before, trainer.model)


def _one_sgd_step(tmp_path, tag, **kw):
    args = _args(tmp_path / tag, max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                 max_grad_norm=1e9, **kw)
    trainer = SFTTrainer(MODEL, args=args, train_dataset=_data(n=8))
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    return loss, _params(trainer.model)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Completions have different lengths, so a per-micro-batch mean would weight tokens differently.
    loss_a, params_a = _one_sgd_step(tmp_path, "a", per_device_train_batch_size=8, gradient_accumulation_steps=1)
    loss_b, params_b = _one_sgd_step(tmp_path, "b", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in params_a:
        assert torch.allclose(params_a[name], params_b[name], atol=1e-5), name


def test_padding_free_matches_padded(tmp_path):
    loss_a, params_a = _one_sgd_step(tmp_path, "a", per_device_train_batch_size=8, padding_free=False)
    loss_b, params_b = _one_sgd_step(tmp_path, "b", per_device_train_batch_size=8, padding_free=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in params_a:
        assert torch.allclose(params_a[name], params_b[name], atol=1e-5), name


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packing(tmp_path, strategy):
    trainer = SFTTrainer(MODEL, args=_args(tmp_path, packing=True, packing_strategy=strategy, max_length=128,
                                           per_device_train_batch_size=2), train_dataset=_data("posttrain/arith-lm"))
    assert "seq_lengths" in trainer.train_dataset.column_names
    assert len(trainer.train_dataset) < 32
    assert max(len(r) for r in trainer.train_dataset["input_ids"]) <= 128
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_completion_only_and_assistant_only_masks(tmp_path):
    data = _data()
    on = SFTTrainer(MODEL, args=_args(tmp_path / "on"), train_dataset=data)
    off = SFTTrainer(MODEL, args=_args(tmp_path / "off", completion_only_loss=False), train_dataset=data)
    row_on, row_off = on.train_dataset[0], off.train_dataset[0]
    assert row_on["input_ids"] == row_off["input_ids"]
    trained_on, trained_off = (sum(t != -100 for t in row["labels"]) for row in (row_on, row_off))
    assert 0 < trained_on < trained_off == len(row_off["input_ids"])  # TRL's prepared form: labels, -100 untrained
    chat = SFTTrainer(MODEL, args=_args(tmp_path / "chat", assistant_only_loss=True),
                      train_dataset=_data("posttrain/arith-lm", "conversational"))
    row = chat.train_dataset[0]
    tok = chat.processing_class
    trained = tok.decode([t for t in row["labels"] if t != -100])
    assert "####" in trained and "<|im_start|>" not in trained and trained.endswith("<|im_end|>")


def test_dft_loss_trains(tmp_path):
    trainer = SFTTrainer(MODEL, args=_args(tmp_path, loss_type="dft"), train_dataset=_data())
    trainer.train()
    assert "dft_weight" in trainer.state.log_history[0]


def test_over_long_examples_are_dropped_and_all_dropped_is_an_error(tmp_path, caplog):
    data = _data()
    with caplog.at_level("WARNING"):
        trainer = SFTTrainer(MODEL, args=_args(tmp_path, max_length=26), train_dataset=data)
    assert len(trainer.train_dataset) < len(data)
    assert "dropped" in caplog.text
    with pytest.raises(ValueError, match="no trainable token left after truncation"):
        SFTTrainer(MODEL, args=_args(tmp_path, max_length=2), train_dataset=data)


def test_wrong_columns_error(tmp_path):
    data = _data().rename_column("prompt", "question_text")
    with pytest.raises(ValueError, match="'prompt' \\+ 'completion'"):
        SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=data)


def test_save_load_and_resume(tmp_path):
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SFTTrainer(MODEL, args=args, train_dataset=_data())
    trainer.train()
    trainer.save_model(args.output_dir)
    final = _params(trainer.model)
    loaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(args.output_dir)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, final[name])
    resumed = SFTTrainer(MODEL, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                         train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for name, param in resumed.model.named_parameters():
        assert torch.allclose(param, final[name], atol=1e-6), name
    assert (tmp_path / "out" / "config.yaml").exists()


def test_eval_with_compute_metrics(tmp_path):
    seen = {}

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        seen["shapes"] = (predictions.shape, labels.shape)
        return {"custom_metric": 1.0}

    trainer = SFTTrainer(MODEL, args=_args(tmp_path, per_device_eval_batch_size=4), train_dataset=_data(),
                         eval_dataset=_data(n=8), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_custom_metric"] == 1.0 and math.isfinite(metrics["eval_loss"])
    assert "eval_mean_token_accuracy" in metrics
    assert seen["shapes"][0][:2] == seen["shapes"][1][:2]


def test_legacy_call_forms_warn_once_and_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = builtin_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with pytest.warns(FutureWarning) as record:
        trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=_data("posttrain/arith-lm", n=16),
                             max_seq_length=256, dataset_text_field="text", packing=True, max_steps=1)
    messages = [str(w.message) for w in record]
    assert any("processing_class" in m for m in messages)
    assert any("SFTConfig(" in m and "max_seq_length" in m for m in messages)
    assert trainer.args.max_length == 256 and trainer.args.packing and trainer.args.max_steps == 1
    assert trainer.args.output_dir.endswith("-SFT")
    trainer.train()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        targs = TrainingArguments(output_dir=str(tmp_path / "ta"), max_steps=1, learning_rate=1e-3,
                                  evaluation_strategy="no", report_to="none")
    with pytest.warns(FutureWarning, match="SFTConfig"):
        trainer = SFTTrainer(model=model, args=targs, train_dataset=_data(n=8), processing_class=tokenizer)
    assert isinstance(trainer.args, SFTConfig) and trainer.args.learning_rate == 1e-3
    assert trainer.args.bf16 is False
    trainer.train()


def test_unknown_keyword_suggests(tmp_path):
    with pytest.raises(TypeError, match="Did you mean 'packing'"):
        SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(), packin=True)


def test_unknown_loss_type_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="nll, dft"):
        _args(tmp_path, loss_type="hinge")


def test_machine_aware_precision_and_legacy_config_names(tmp_path):
    import posttrain.hardware as hw

    args = _args(tmp_path)
    if not hw.has_cuda():
        assert args.bf16 is False and args.dataloader_pin_memory is False
    with pytest.warns(FutureWarning, match="warmup_steps"):
        legacy = SFTConfig(output_dir=str(tmp_path), warmup_ratio=0.1, evaluation_strategy="no", report_to="none")
    assert legacy.warmup_steps == 0.1


def test_bf16_auto_follows_the_hardware(tmp_path, monkeypatch):
    """bf16="auto" (YAML, command line or Python): on where bf16 is native, a CPU with AVX512-BF16/AMX included;
    off where it would be emulated. Anything but true/false/auto is a one-line error."""
    import posttrain.hardware as hw
    from posttrain.cli import parse_command_args
    from posttrain.errors import UserError

    monkeypatch.setattr(hw, "has_cuda", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(hw, "cpu_has_fast_bf16", lambda native=native: native)
        assert _args(tmp_path, bf16="auto").bf16 is native
        assert _args(tmp_path, bf16="AUTO").bf16 is native
        *_, cli_args = parse_command_args("sft", ["--output_dir", str(tmp_path), "--bf16", "auto"])
        assert cli_args.bf16 is native
        config = tmp_path / "c.yaml"
        config.write_text(f"output_dir: {tmp_path}\nbf16: auto\n")
        *_, yaml_args = parse_command_args("sft", ["--config", str(config)])
        assert yaml_args.bf16 is native
    *_, plain = parse_command_args("sft", ["--output_dir", str(tmp_path), "--bf16", "false"])
    assert plain.bf16 is False
    with pytest.warns(UserWarning, match="30x slower"):  # bare --bf16 is true, as in TrainingArguments
        *_, bare = parse_command_args("sft", ["--output_dir", str(tmp_path), "--bf16"])
    assert bare.bf16 is True
    with pytest.raises(UserError, match="bf16 must be true, false or auto, got 'sometimes'"):
        _args(tmp_path, bf16="sometimes")
    with pytest.raises(UserError, match="--bf16"):
        parse_command_args("sft", ["--output_dir", str(tmp_path), "--bf16", "sometimes"])


def test_lora_trains_adapters_only(tmp_path):
    from peft import LoraConfig

    trainer = SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=_data(),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == ("lora_" in name), name
