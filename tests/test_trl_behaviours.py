"""TRL 1.16 behaviours the offline trainers (SFT, DPO, reward, KTO, ORPO, CPO) share with TRL: its config fields and
constructor arguments exist and act, streamed datasets train, raw eval sets are prepared, MoE router losses are
added, pre-tokenised and transformed datasets are taken, early ValueErrors, model tags."""

import dataclasses
import inspect
import json
import math
import os

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from posttrain import (
    CPOConfig,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path

MODEL = "posttrain/tiny"
COMMON = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to="none",
              save_strategy="no", seed=0)


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def _data(name, config="standard", n=16):
    return load_builtin_dataset(name, config, split=f"train[:{n}]")


def _trl():
    trl = pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return trl


# ---- 1. every config field TRL has exists here ---------------------------------------------------------------
def test_offline_configs_take_every_trl_field():
    trl = _trl()
    from trl.experimental.cpo import CPOConfig as TrlCPO
    from trl.experimental.orpo import ORPOConfig as TrlORPO

    pairs = [(trl.SFTConfig, SFTConfig), (trl.DPOConfig, DPOConfig), (trl.RewardConfig, RewardConfig),
             (trl.KTOConfig, KTOConfig), (TrlCPO, CPOConfig), (TrlORPO, ORPOConfig)]
    for theirs, ours in pairs:
        missing = {f.name for f in dataclasses.fields(theirs)} - set(inspect.signature(ours).parameters)
        assert not missing, f"{ours.__name__} lacks {sorted(missing)}"


def test_offline_trainers_take_every_trl_constructor_argument():
    trl = _trl()
    for name in ("SFTTrainer", "DPOTrainer", "RewardTrainer", "KTOTrainer"):
        theirs = list(inspect.signature(getattr(trl, name)).parameters)
        ours = list(inspect.signature(globals()[name]).parameters)
        assert ours[:len(theirs)] == theirs, name  # same names in the same order: positional calls work too


def test_trust_remote_code_reaches_from_pretrained(tmp_path, monkeypatch):
    from posttrain.models import loading

    seen = {}
    real = loading.load_pretrained_model

    def spy(name, auto_class=None, **kwargs):
        seen.update(kwargs)
        kwargs.pop("trust_remote_code", None)
        return real(name, auto_class, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained_model", spy)
    SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, trust_remote_code=True), train_dataset=_data("posttrain/arith-sft"))
    assert seen["trust_remote_code"] is True


def test_shuffle_dataset_shuffles_prepared_rows(tmp_path):
    data = _data("posttrain/arith-lm", n=32)
    plain = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=data).train_dataset
    mixed = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, shuffle_dataset=True), train_dataset=data).train_dataset
    a, b = [tuple(r) for r in plain["input_ids"]], [tuple(r) for r in mixed["input_ids"]]
    assert a != b and sorted(a) == sorted(b)


def test_dpo_padding_free_false_gives_the_same_loss(tmp_path):
    losses = []
    for padding_free in (False, None):
        trainer = DPOTrainer(MODEL, args=_args(DPOConfig, tmp_path, padding_free=padding_free, max_length=96),
                             train_dataset=_data("posttrain/arith-pref", n=4))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    with pytest.raises(ValueError, match="padding_free"):
        DPOConfig(output_dir=str(tmp_path), padding_free=True, packed_attention=False)


def test_reward_eos_token_and_chat_template_path(tmp_path):
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    other = tok.convert_ids_to_tokens(5)
    trainer = RewardTrainer(MODEL, args=_args(RewardConfig, tmp_path, eos_token=other),
                            train_dataset=_data("posttrain/arith-pref", n=4))
    assert trainer.train_dataset[0]["chosen_ids"][-1] == 5
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    trainer = RewardTrainer(MODEL, args=_args(RewardConfig, tmp_path, chat_template_path=str(template)),
                            train_dataset=_data("posttrain/arith-pref", "conversational", n=4))
    assert trainer.processing_class.chat_template == template.read_text()
    assert trainer.processing_class.decode(trainer.train_dataset[0]["chosen_ids"]).startswith("<<")


def test_orpo_generate_during_eval_writes_samples(tmp_path):
    data = _data("posttrain/arith-pref", n=8)
    args = _args(ORPOConfig, tmp_path, generate_during_eval=True, max_length=64, per_device_eval_batch_size=2)
    trainer = ORPOTrainer(MODEL, args=args, train_dataset=data, eval_dataset=data)
    trainer.evaluate()
    with open(os.path.join(args.output_dir, "eval_generations.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and all({"step", "prompt", "policy"} <= set(r) for r in rows)
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        CPOConfig(output_dir=str(tmp_path), is_encoder_decoder=True)


def test_orpo_padding_value_pads_input_ids(tmp_path):
    trainer = ORPOTrainer(MODEL, args=_args(ORPOConfig, tmp_path, padding_value=7),
                          train_dataset=_data("posttrain/arith-pref", n=4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all()


def test_activation_offloading_is_refused_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="activation_offloading"):
        SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, activation_offloading=True, use_cpu=True),
                   train_dataset=_data("posttrain/arith-sft"))


# ---- MoE router loss -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("coef", [None, 0.5, 0.0])
def test_router_aux_loss_is_added_for_moe_models(tmp_path, coef, tiny_moe):
    model, tok = tiny_moe()
    trainer = SFTTrainer(model, args=_args(SFTConfig, tmp_path, router_aux_loss_coef=coef, max_steps=1),
                         processing_class=tok, train_dataset=_data("posttrain/arith-sft", n=8))
    expected = 0.02 if coef is None else coef
    assert trainer.router_aux_loss_coef == expected and trainer.aux_loss_enabled == (expected != 0)
    assert model.config.output_router_logits == (expected != 0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    with_aux = trainer.compute_loss(trainer.model, batch)
    trainer.aux_loss_enabled, saved = False, trainer._router_losses
    trainer._router_losses = None
    plain = trainer.compute_loss(trainer.model, batch)
    trainer._router_losses = saved
    if expected:
        aux = model(**{k: batch[k] for k in ("input_ids", "position_ids") if k in batch},
                    output_router_logits=True).aux_loss
        assert float(with_aux - plain) == pytest.approx(expected * float(aux), rel=1e-4)
        trainer.train()
        assert "aux_loss" in trainer.state.log_history[0]
    else:
        assert float(with_aux) == pytest.approx(float(plain))


def test_router_aux_loss_coef_is_refused_without_a_router(tmp_path):
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, router_aux_loss_coef=0.1),
                   train_dataset=_data("posttrain/arith-sft"))
    trainer = DPOTrainer(MODEL, args=_args(DPOConfig, tmp_path), train_dataset=_data("posttrain/arith-pref", n=4))
    assert trainer.aux_loss_enabled is False


# ---- 2. constructor arguments --------------------------------------------------------------------------------
def test_quantization_config_is_checked_where_it_applies(tmp_path):
    from transformers import BitsAndBytesConfig

    from posttrain import hardware

    bnb = BitsAndBytesConfig(load_in_4bit=True)
    data = _data("posttrain/arith-sft")
    if not hardware.has_cuda():
        with pytest.raises(ValueError, match="CUDA GPU"):
            SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=data, quantization_config=bnb)
    with pytest.raises(ValueError, match="both"):
        SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, model_init_kwargs={"quantization_config": {}}),
                   train_dataset=data, quantization_config=bnb)
    from posttrain.models import loading

    model = loading.load_pretrained_model(MODEL)
    with pytest.raises(ValueError, match="already"):
        DPOTrainer(model, args=_args(DPOConfig, tmp_path), train_dataset=_data("posttrain/arith-pref"),
                   quantization_config=bnb)


def test_optimizer_cls_and_kwargs_builds_that_optimizer(tmp_path):
    trainer = RewardTrainer(MODEL, args=_args(RewardConfig, tmp_path, max_steps=1),
                            train_dataset=_data("posttrain/arith-pref", n=4),
                            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.01, "momentum": 0.5}))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.5


def test_compute_loss_func_replaces_the_sft_loss(tmp_path):
    calls = []

    def mean_ce(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())

    data = _data("posttrain/arith-sft", n=8)
    custom = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, padding_free=False), train_dataset=data,
                        compute_loss_func=mean_ce)
    plain = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, padding_free=False), train_dataset=data)
    batch = plain.data_collator([plain.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        assert float(custom.compute_loss(custom.model, batch)) == pytest.approx(
            float(plain.compute_loss(plain.model, batch)), rel=1e-5)
    custom.train()
    assert calls and calls[-1] is not None
    with pytest.raises(ValueError, match="compute_loss_func"):
        DPOTrainer(MODEL, args=_args(DPOConfig, tmp_path), train_dataset=_data("posttrain/arith-pref"),
                   compute_loss_func=mean_ce)


# ---- 3. streamed datasets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_cls,config_cls,name,extra", [
    (SFTTrainer, SFTConfig, "posttrain/arith-sft", {}),
    (SFTTrainer, SFTConfig, "posttrain/arith-lm", {"packing": True, "max_length": 64, "shuffle_dataset": True}),
    (DPOTrainer, DPOConfig, "posttrain/arith-pref", {}),
    (RewardTrainer, RewardConfig, "posttrain/arith-pref", {}),
    (KTOTrainer, KTOConfig, "posttrain/arith-kto", {}),
    (ORPOTrainer, ORPOConfig, "posttrain/arith-pref-implicit", {}),
])
def test_streamed_datasets_train(tmp_path, trainer_cls, config_cls, name, extra):
    stream = _data(name, n=16).to_iterable_dataset()
    trainer = trainer_cls(MODEL, args=_args(config_cls, tmp_path, **extra), train_dataset=stream)
    assert isinstance(trainer.train_dataset, datasets.IterableDataset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ---- 4. data forms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_cls,config_cls,name", [
    (SFTTrainer, SFTConfig, "posttrain/arith-sft"), (DPOTrainer, DPOConfig, "posttrain/arith-pref"),
    (RewardTrainer, RewardConfig, "posttrain/arith-pref"), (KTOTrainer, KTOConfig, "posttrain/arith-kto")])
def test_evaluate_prepares_a_raw_eval_dataset(tmp_path, trainer_cls, config_cls, name):
    trainer = trainer_cls(MODEL, args=_args(config_cls, tmp_path), train_dataset=_data(name, n=8))
    metrics = trainer.evaluate(eval_dataset=_data(name, n=8))
    assert math.isfinite(metrics["eval_loss"])
    metrics = trainer.evaluate(eval_dataset={"a": _data(name, n=4)})
    assert math.isfinite(metrics["eval_a_loss"])


def test_dtype_object_in_model_init_kwargs_is_written_by_name(tmp_path):
    args = _args(DPOConfig, tmp_path, max_steps=1, model_init_kwargs={"dtype": torch.float16})
    assert json.loads(args.to_json_string())["model_init_kwargs"] == {"dtype": "float16"}
    assert args.to_flat_dict()["model_init_kwargs"] == {"dtype": "float16"}
    trainer = DPOTrainer(MODEL, args=args, train_dataset=_data("posttrain/arith-pref", n=4))
    assert trainer.model.dtype == torch.float16
    trainer.save_run_config()
    assert "dtype: float16" in open(os.path.join(args.output_dir, "config.yaml")).read()


def _flag_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    tok.chat_template = ("{% if think %}<think>{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def test_chat_template_kwargs_column_is_rendered(tmp_path):
    tok = _flag_template(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}],
             "chat_template_kwargs": {"think": flag}} for flag in (True, False)]
    trainer = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows))
    texts = [tok.decode(trainer.train_dataset[i]["input_ids"]) for i in range(2)]
    assert "<think>" in texts[0] and "<think>" not in texts[1]
    from posttrain.data.tokenize import tokenize_prompt  # the online trainers' prompt renderer takes it too

    assert "<think>" in tok.decode(tokenize_prompt(tok, rows[0]["prompt"], chat_template_kwargs={"think": True}))


def test_tools_as_json_text_are_decoded():
    from posttrain.data.tokenize import render

    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    tok.chat_template = "{% for t in tools %}[{{ t['name'] }}]{% endfor %}{{ messages[0]['content'] }}"
    assert render(tok, [{"role": "user", "content": "hi"}], tools='[{"name": "calc"}]') == "[calc]hi"


@pytest.mark.parametrize("columns", [("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids"),
                                     ("input_ids_chosen", "input_ids_rejected")])
def test_reward_takes_pretokenized_pairs(tmp_path, columns):
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    raw = _data("posttrain/arith-pref", n=8)
    data = raw.map(lambda ex: {columns[0]: tok(ex["prompt"] + ex["chosen"])["input_ids"],
                               columns[1]: tok(ex["prompt"] + ex["rejected"])["input_ids"]},
                   remove_columns=raw.column_names)
    if columns[0] == "chosen_ids":
        trainer = RewardTrainer(MODEL, args=_args(RewardConfig, tmp_path), train_dataset=data)
    else:
        with pytest.warns(FutureWarning, match="will not be supported in v1"):
            trainer = RewardTrainer(MODEL, args=_args(RewardConfig, tmp_path), train_dataset=data)
    assert trainer.train_dataset[0]["prompt_ids"] == []
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_sft_formatting_func_with_extra_columns(tmp_path):
    data = _data("posttrain/arith-sft", n=8).add_column("source", ["x"] * 8)
    trainer = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=data,
                         formatting_func=lambda ex: f"Q: {ex['prompt']} A: {ex['completion']}")
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]  # formatted text is language modelling: every token trained
    assert trainer.processing_class.decode(row["input_ids"]).startswith("Q: ")
    trainer.train()


def test_with_transform_dataset(tmp_path):
    tok = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    raw = _data("posttrain/arith-lm", n=16)

    def tokenize(batch):
        return {"input_ids": [tok(t + tok.eos_token)["input_ids"] for t in batch["text"]]}

    args = _args(SFTConfig, tmp_path, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(MODEL, args=args, train_dataset=raw.with_transform(tokenize))
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="with_transform"):
        SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=raw.with_transform(tokenize))


# ---- 6. early errors and tags ----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_cls,config_cls", [(SFTTrainer, SFTConfig), (DPOTrainer, DPOConfig),
                                                    (RewardTrainer, RewardConfig), (KTOTrainer, KTOConfig),
                                                    (ORPOTrainer, ORPOConfig)])
def test_train_dataset_is_required(tmp_path, trainer_cls, config_cls):
    with pytest.raises(ValueError, match="train_dataset"):
        trainer_cls(MODEL, args=_args(config_cls, tmp_path), train_dataset=None)


def test_ref_model_is_model_is_refused(tmp_path):
    from posttrain.models import loading

    model = loading.load_pretrained_model(MODEL)
    for cls, config, name in ((DPOTrainer, DPOConfig, "posttrain/arith-pref"),
                              (KTOTrainer, KTOConfig, "posttrain/arith-kto")):
        with pytest.raises(ValueError, match="policy itself"):
            cls(model, ref_model=model, args=_args(config, tmp_path), train_dataset=_data(name))


def test_model_tags_and_card(tmp_path):
    trainer = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=_data("posttrain/arith-sft"))
    assert {"posttrain", "sft"} <= set(trainer.model.model_tags)
    trainer.create_model_card(tags=["mine"])
    card = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "- posttrain" in card and "- sft" in card and "- mine" in card
    assert set(RewardTrainer._tag_names) == {"posttrain", "reward-trainer"}


# ---- 5. collators: TRL's names and batch keys ------------------------------------------------------------------
def test_language_modeling_collator_takes_prebuilt_labels_and_returns_trl_keys():
    from posttrain.trainers.sft import DataCollatorForLanguageModeling

    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and flat["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5] and flat["max_length_k"] == 3
    assert flat["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    with_positions = DataCollatorForLanguageModeling(0, return_position_ids=True)(examples)
    assert with_positions["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_preference_collator_returns_completion_mask_and_truncates():
    from posttrain.trainers.dpo import DataCollatorForPreference

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                                                 [0, 0, 1, 1, 0]]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}  # TRL's keys only
    cut = DataCollatorForPreference(pad_token_id=0, max_length=3, truncation_mode="keep_end")(examples)
    assert cut["input_ids"][0].tolist() == [3, 4, 5]
    reward = DataCollatorForPreference(pad_token_id=0)([{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": 0.5}])
    assert reward["input_ids"].tolist() == [[1, 2], [3, 0]] and reward["margin"].tolist() == [0.5]


def test_unpaired_preference_collator_and_kto_takes_it(tmp_path):
    from posttrain.trainers.kto import DataCollatorForUnpairedPreference

    examples = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True, "KL_completion_ids": [6]},
                {"prompt_ids": [7, 8], "completion_ids": [9], "label": False, "KL_completion_ids": [4, 5]}]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["KL_input_ids"].tolist() == [[1, 2, 3, 6], [7, 8, 4, 5]]
    assert batch["label"].tolist() == [True, False]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "KL_input_ids", "KL_attention_mask",
                          "KL_completion_mask", "label"}  # TRL's keys only
    data = _data("posttrain/arith-kto", n=8)
    trainer = KTOTrainer(MODEL, args=_args(KTOConfig, tmp_path, loss_type="apo_zero_unpaired"), train_dataset=data,
                         data_collator=DataCollatorForUnpairedPreference(pad_token_id=0))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_sft_prepared_rows_carry_labels_as_trl(tmp_path):
    given = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, -100]},
                                        {"input_ids": [5, 6], "labels": [-100, 6]}])
    trainer = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path), train_dataset=given)
    assert trainer.train_dataset[:]["labels"] == [[1, -100, 3, -100], [-100, 6]]
    masked = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4, 5], "assistant_masks": [0, 0, 0, 1, 1]},
                                         {"input_ids": [6, 7, 8], "assistant_masks": [1, 1, 1]}])
    trainer = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, max_length=3), train_dataset=masked)
    assert trainer.train_dataset[:]["labels"] == [[6, 7, 8]]  # the first row has nothing trained left
    packed = SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, packing=True, max_length=64),
                        train_dataset=_data("posttrain/arith-sft")).train_dataset
    assert set(packed.column_names) == {"input_ids", "labels", "seq_lengths"}
    with pytest.raises(ValueError, match="Add a 'labels' column"):
        SFTTrainer(MODEL, args=_args(SFTConfig, tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
                   train_dataset=masked)


def test_dpo_precompute_with_late_eval_and_streams(tmp_path):
    train, late = _data("posttrain/arith-pref", n=8), load_builtin_dataset("posttrain/arith-pref", "standard",
                                                                              split="test[:4]")
    trainer = DPOTrainer(MODEL, args=_args(DPOConfig, tmp_path, max_steps=1, precompute_ref_log_probs=True),
                         train_dataset=train)
    assert math.isfinite(trainer.evaluate(eval_dataset=late)["eval_loss"])  # untrained: the policy is the reference
    trainer.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(eval_dataset=late)
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        DPOTrainer(MODEL, args=_args(DPOConfig, tmp_path, precompute_ref_log_probs=True), train_dataset=train,
                   eval_dataset={"s": late.to_iterable_dataset()})


def test_kto_unpairing_keeps_chat_template_kwargs(tmp_path):
    tok = _flag_template(tmp_path)
    data = _data("posttrain/arith-pref", "conversational", n=4)
    data = data.add_column("chat_template_kwargs", [{"think": bool(i % 2)} for i in range(4)])
    trainer = KTOTrainer(MODEL, args=_args(KTOConfig, tmp_path), processing_class=tok, train_dataset=data)
    prompts = [tok.decode(row["prompt_ids"]) for row in trainer.train_dataset]
    assert len(prompts) == 8 and sum("<think>" in p for p in prompts) == 4
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert (batch["completion_mask"] == (batch["labels"] != -100)).all()
