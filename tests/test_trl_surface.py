"""TRL's public surface under posttrain (issue 27, part A): the data helpers (`posttrain.data_utils`), the script
helpers (`TrlParser`, `get_peft_config`, …), the math rewards (LaTeX answers through math-verify), the callbacks
users attach, TRL's module paths as aliases, and the generated checklist docs/TRL-COMPAT.md being up to date."""

import importlib
import importlib.util
import json
import math
import os
import types

import datasets
import pytest
import torch

from posttrain.errors import UserError

MODEL = "posttrain/tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(role, text):
    return [{"role": role, "content": text}]


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(MODEL)


# ---- data helpers ----------------------------------------------------------------------------------------------

def test_apply_chat_template_every_row_type(tokenizer):
    from posttrain.data_utils import apply_chat_template, maybe_apply_chat_template

    prompt, good, bad = _conv("user", "2+2?"), _conv("assistant", "4"), _conv("assistant", "5")
    start = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template({"prompt": prompt, "completion": good}, tokenizer) == {
        "prompt": start, "completion": "4<|im_end|>\n"}
    assert apply_chat_template({"messages": prompt + good}, tokenizer) == {"text": start + "4<|im_end|>\n"}
    row = apply_chat_template({"prompt": prompt, "chosen": good, "rejected": bad}, tokenizer)
    assert row == {"prompt": start, "chosen": "4<|im_end|>\n", "rejected": "5<|im_end|>\n"}
    row = apply_chat_template({"prompt": prompt, "completion": good, "label": True}, tokenizer)
    assert row["label"] is True
    implicit = apply_chat_template({"chosen": prompt + good, "rejected": prompt + bad}, tokenizer)
    assert implicit["chosen"] == start + "4<|im_end|>\n"
    # a final assistant message is continued, not closed
    assert apply_chat_template({"prompt": prompt + good}, tokenizer)["prompt"] == start + "4"
    standard = {"prompt": "The sky is", "completion": " blue."}
    assert maybe_apply_chat_template(standard, tokenizer) is standard
    with pytest.raises(KeyError, match="Invalid keys"):
        apply_chat_template({"prompt": prompt, "chosen": good}, tokenizer)


def test_prompt_extraction_and_conversational_checks():
    from posttrain.data_utils import (
        extract_prompt,
        is_conversational,
        is_conversational_from_value,
        maybe_convert_to_chatml,
        maybe_extract_prompt,
    )

    chosen = _conv("user", "What color is the sky?") + _conv("assistant", "It is blue.")
    rejected = _conv("user", "What color is the sky?") + _conv("assistant", "It is green.")
    out = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert out == {"prompt": chosen[:1], "chosen": chosen[1:], "rejected": rejected[1:]}
    # a text prompt next to conversational chosen/rejected is replaced by the extracted one
    assert maybe_extract_prompt({"prompt": "What color?", "chosen": chosen, "rejected": rejected}) == out
    explicit = {"prompt": chosen[:1], "chosen": chosen[1:], "rejected": rejected[1:]}
    assert maybe_extract_prompt(explicit) is explicit
    assert extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == {
        "prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert is_conversational({"prompt": _conv("user", "x")}) and not is_conversational({"prompt": "x"})
    assert is_conversational_from_value({"conversations": [{"from": "human", "value": "hi"}]})
    assert maybe_convert_to_chatml({"prompt": [{"from": "human", "value": "hi"}], "x": 1}) == {
        "prompt": [{"role": "user", "content": "hi"}], "x": 1}
    assert maybe_convert_to_chatml({"conversations": [{"from": "gpt", "value": "yo"}]}) == {
        "messages": [{"role": "assistant", "content": "yo"}]}
    assert not is_conversational_from_value({"conversations": _conv("user", "hi")})


def test_unpair_preference_dataset_keeps_extra_columns():
    from posttrain.data_utils import maybe_unpair_preference_dataset, unpair_preference_dataset

    data = datasets.Dataset.from_dict({"prompt": ["The sky is", "The sun is"], "chosen": [" blue.", " in the sky."],
                                       "rejected": [" green.", " in the sea."], "id": [7, 8]})
    out = unpair_preference_dataset(data)
    assert len(out) == 4 and sorted(out.column_names) == ["completion", "id", "label", "prompt"]
    assert out[0] == {"prompt": "The sky is", "id": 7, "completion": " blue.", "label": True}
    assert out[2] == {"prompt": "The sky is", "id": 7, "completion": " green.", "label": False}  # TRL's order
    assert out["label"] == [True, True, False, False] and out["id"] == [7, 8, 7, 8]
    assert maybe_unpair_preference_dataset(out) is out
    implicit = unpair_preference_dataset(data.remove_columns("prompt"))
    assert "prompt" not in implicit.column_names and len(implicit) == 4
    split = maybe_unpair_preference_dataset(datasets.DatasetDict({"train": data}))
    assert len(split["train"]) == 4


def test_pack_and_truncate_dataset_match_trl_examples():
    from posttrain.data_utils import pack_dataset, truncate_dataset

    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
                                       "attention_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]]})
    # TRL's documented results (trl.data_utils.pack_dataset docstring)
    assert pack_dataset(data, seq_length=4, strategy="bfd")[:] == {
        "input_ids": [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]],
        "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0]], "seq_lengths": [[4], [3, 1], [2]]}
    assert pack_dataset(data, seq_length=4, strategy="bfd_split")[:] == {
        "input_ids": [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]],
        "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1]], "seq_lengths": [[4], [3, 1], [2, 1]]}
    assert pack_dataset(data, seq_length=3, strategy="wrapped")[:] == {  # no document boundaries, as TRL
        "input_ids": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]],
        "attention_mask": [[1, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1]]}
    numpy = pack_dataset(data.with_format("numpy", dtype="float32"), seq_length=4)
    assert numpy.format["type"] == "numpy" and numpy.format["format_kwargs"] == {"dtype": "float32"}
    assert numpy.format["columns"] == ["input_ids", "attention_mask", "seq_lengths"]
    with pytest.raises(TypeError, match="lists"):
        pack_dataset(data.add_column("n", [1, 2, 3, 4]), 4)
    with pytest.raises(UserError, match="num_proc"):
        pack_dataset(data, 4, map_kwargs={"num_proc": 2})
    short = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8]],
                                        "attention_mask": [[0, 1, 1], [0, 0, 1, 1], [1]]})
    assert truncate_dataset(short, max_length=2)[:] == {"input_ids": [[1, 2], [4, 5], [8]],
                                                         "attention_mask": [[0, 1], [0, 0], [1]]}


def test_prepare_multimodal_messages():
    from posttrain.data_utils import prepare_multimodal_messages

    messages = _conv("user", "What's in this image?") + _conv("assistant", "A cat.")
    out = prepare_multimodal_messages(messages, images=["IMG"])
    assert out == [{"role": "user", "content": [{"type": "image", "image": "IMG"},
                                                {"type": "text", "text": "What's in this image?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    assert messages[0]["content"] == "What's in this image?"  # inputs untouched
    with pytest.raises(ValueError, match="does not match"):
        prepare_multimodal_messages([{"role": "user", "content": [{"type": "image"}]}], images=[])


def test_clone_chat_template(tmp_path, tokenizer):
    from posttrain.data_utils import clone_chat_template
    from posttrain.models.loading import load_pretrained_model, load_tokenizer

    source = load_tokenizer(MODEL)
    source.add_tokens(["<tool_call>"], special_tokens=True)
    source.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    source.save_pretrained(tmp_path / "src")
    model, target = load_pretrained_model(MODEL), load_tokenizer(MODEL)
    model, target, added = clone_chat_template(model, target, str(tmp_path / "src"), resize_to_multiple_of=64)
    assert target.chat_template == source.chat_template
    assert "<tool_call>" in target.get_vocab() and any(str(t) == "<tool_call>" for t in added)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows == len(target.get_vocab())
    assert model.config.eos_token_id == target.eos_token_id


# ---- script helpers --------------------------------------------------------------------------------------------

def test_trl_parser_yaml_env_and_flags(tmp_path, monkeypatch):
    from posttrain import (
        ModelConfig,
        ScriptArguments,
        SFTConfig,
        TrlParser,
        get_kbit_device_map,
        get_peft_config,
        get_quantization_config,
    )

    monkeypatch.delenv("POSTTRAIN_TEST27", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: posttrain/tiny\ndataset_name: posttrain/arith-sft\nlearning_rate: 0.5\n"
                      "max_seq_length: 64\nenv:\n  POSTTRAIN_TEST27: value27\n")
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    script, training, model = parser.parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), "--learning_rate", "0.1", "--use_peft", "True"])
    assert script.dataset_name == "posttrain/arith-sft" and model.model_name_or_path == MODEL
    assert training.learning_rate == 0.1 and training.max_length == 64  # flag beats YAML; old name translated
    assert os.environ["POSTTRAIN_TEST27"] == "value27"
    assert get_peft_config(model).r == model.lora_r
    assert get_quantization_config(model) is None
    if not torch.cuda.is_available():
        assert get_kbit_device_map() is None
    config.write_text("learnin_rate: 0.5\n")
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        parser.parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path)])
    *_, rest = parser.parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path)],
                                            return_remaining_strings=True)
    assert rest == ["--learnin_rate", "0.5"]
    with pytest.raises(UserError, match="only applies to 4-bit"):
        ModelConfig(use_bnb_nested_quant=True)


def test_trl_style_sft_script_with_dataset_mixture(tmp_path):
    """TRL 1.16's scripts/sft.py flow with `trl` → `posttrain` (quantization_config= left out: another branch adds
    that constructor argument)."""
    from posttrain import (
        DatasetMixtureConfig,
        ModelConfig,
        ScriptArguments,
        SFTConfig,
        SFTTrainer,
        TrlParser,
        get_dataset,
        get_peft_config,
    )

    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: posttrain/tiny\nmax_steps: 1\nper_device_train_batch_size: 4\n"
                      "report_to: none\nsave_strategy: 'no'\nmax_length: 64\n"
                      "datasets:\n  - path: posttrain/arith-sft\n    split: train[:12]\n    columns: [prompt, completion]\n"
                      "    fraction: 0.5\n  - path: posttrain/arith-sft\n    split: train[12:20]\n    fraction: 0.5\n"
                      "test_split_size: 0.25\n")
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert script_args.datasets is None and dataset_args.datasets[0].columns == ["prompt", "completion"]
    training_args.model_init_kwargs = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                                           trust_remote_code=training_args.trust_remote_code,
                                           attn_implementation=model_args.attn_implementation)
    dataset = get_dataset(dataset_args)
    assert len(dataset["train"]) + len(dataset["test"]) == 16  # 8 rows each: the smaller dataset caps the mixture
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=dataset["train"],
                         eval_dataset=dataset["test"], peft_config=get_peft_config(model_args))
    trainer.train()
    assert trainer.state.global_step == 1


# ---- rewards ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,gold,expected", [
    (r"The answer is \boxed{3}", r"\frac{1}{3}", 0.0),       # last-number matching called this right
    (r"\boxed{2}", r"\sqrt{2}", 0.0),
    (r"\boxed{1+x^2}", r"x^2+1", 1.0),                        # last-number matching called this wrong
    (r"so the answer is $\frac{1}{3}$", r"$\frac{1}{3}$", 1.0),
    (r"My answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}", 0.0),
    (r"\boxed{\frac{1}{3}}", "3", 0.0),                       # plain gold, LaTeX answer: verified, not last number
    (r"\boxed{\frac{6}{2}}", "3", 1.0),
    ("7 + 5 = 12\n#### 12", "12", 1.0),                        # plain path kept for the arithmetic data
    ("I think 3 then 12", "12", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("#### 13", "5 + 7 = 12\n#### 12", 0.0),                   # GSM8K solution text
    ("#### 12", "unknown", None),
    ("#### 12", None, None),
])
def test_accuracy_reward_latex_and_plain(completion, gold, expected):
    from posttrain.rewards import accuracy_reward

    assert accuracy_reward([completion], solution=[gold]) == [expected]
    assert accuracy_reward([_conv("assistant", completion)], [gold]) == [expected]  # TRL's positional call


def test_accuracy_reward_log_extra():
    from posttrain.rewards import accuracy_reward

    logged = {}
    accuracy_reward([r"\boxed{\frac{1}{3}}", "x"], solution=[r"\frac{1}{3}", "no answer"],
                    log_extra=lambda key, values: logged.__setitem__(key, values))
    assert set(logged) == {"solution", "gold_parsed", "answer_parsed"}
    assert logged["answer_parsed"][1] == "[skipped]" and len(logged["gold_parsed"]) == 2


def test_repetition_penalty_counts_token_ngrams():
    from posttrain.rewards import get_repetition_penalty_reward, repetition_penalty_reward

    reward = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    # [5]*5 has 4 bigrams, 1 unique: −(1 − 1/4); TRL 1.16's documented example
    assert reward([[1, 2, 3, 4], [5, 5, 5, 5, 5]]) == [0.0, -0.75]
    # the trainers pass both: the token ids decide (the text has no repetition here)
    assert repetition_penalty_reward(completion_ids=[[1, 2, 3, 1, 2, 3]], completions=["one two three"]) == [-0.25]


def test_reasoning_accuracy_and_cosine_scaled_rewards():
    from posttrain.rewards import BUILTIN_REWARDS, get_cosine_scaled_reward, reasoning_accuracy_reward

    solutions = [r"\frac{1}{3}"] * 3
    completions = [_conv("assistant", r"<think> r </think> The final answer is \boxed{\frac{1}{3}}"),
                   _conv("assistant", r"<think> r </think> The final answer is \boxed{\frac{1}{2}}"),
                   _conv("assistant", r"<think> partial \boxed{\frac{1}{3}} but no final answer")]
    assert reasoning_accuracy_reward(completions, solutions) == [1.0, 0.0, 0.0]
    assert reasoning_accuracy_reward(["<answer>#### 4"], answer=["4"], reasoning_delimiters=["<answer>"]) == [1.0]
    assert BUILTIN_REWARDS["reasoning_accuracy_reward"] is reasoning_accuracy_reward
    reward = get_cosine_scaled_reward(max_len=100)
    pair = [_conv("assistant", r"\boxed{\frac{1}{3}}"), _conv("assistant", r"\boxed{\frac{1}{2}}")]
    # R = v_min + ½(v_max − v_min)(1 + cos(π·|y|/L)): |y| = L/2 → the midpoint of each range
    assert reward(pair, [r"\frac{1}{3}"] * 2, [[1] * 50, [1] * 50]) == pytest.approx([0.75, -0.75])
    # |y| = 0: best right / worst wrong; |y| ≥ L clamps to the long end (right 0.5, wrong −0.5)
    assert reward(pair, [r"\frac{1}{3}"] * 2, [[], []]) == pytest.approx([1.0, -1.0])
    assert reward(pair, [r"\frac{1}{3}"] * 2, [[1] * 300] * 2) == pytest.approx([0.5, -0.5])
    assert reward(pair, [None, "unknown"], [[1], [1]]) == [None, None]


# ---- callbacks -------------------------------------------------------------------------------------------------

def _sft_args(tmp_path, **kw):
    from posttrain import SFTConfig

    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to="none", save_strategy="no", max_length=64, seed=0)
    return SFTConfig(**{**base, **kw})


def _data(name, n=8, config=None):
    from posttrain.data.arith import load_builtin_dataset

    return load_builtin_dataset(name, config, split=f"train[:{n}]")


def test_bema_formula_by_hand():
    from posttrain import BEMACallback

    cb = BEMACallback(update_freq=1, ema_power=0.5, bias_power=0.2, lag=10)
    assert cb.ema_beta(6) == pytest.approx(16 ** -0.5) and cb.bema_alpha(6) == pytest.approx(16 ** -0.2)
    param = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Linear(1, 1, bias=False)
    cb.running_model, cb._params = model, {"weight": param}
    cb.theta0, cb.ema = {"weight": torch.tensor([1.0])}, {"weight": torch.tensor([1.0])}
    param.data.fill_(3.0)
    cb._update_bema_weights(6)  # EMA = (1 − β)·1 + β·3; θ' = EMA + α·(3 − 1)
    beta, alpha = 16 ** -0.5, 16 ** -0.2
    assert model.weight.item() == pytest.approx((1 - beta) + 3 * beta + 2 * alpha)


def test_bema_callback_trains_and_saves(tmp_path):
    from posttrain import BEMACallback, SFTTrainer

    bema = BEMACallback(update_freq=1)
    trainer = SFTTrainer(MODEL, args=_sft_args(tmp_path, max_steps=2), train_dataset=_data("posttrain/arith-sft"),
                         callbacks=[bema])
    trainer.train()
    assert os.path.isfile(os.path.join(trainer.args.output_dir, "bema", "config.json"))
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    running = dict(bema.running_model.named_parameters())[name]
    assert not torch.equal(running.cpu(), param.detach().cpu())  # averaged, not a copy of the final weights
    assert not torch.equal(running.cpu(), bema.theta0[name])


def test_sync_ref_model_callback_mixes_reference(tmp_path):
    from posttrain import DPOConfig, DPOTrainer, SyncRefModelCallback
    from posttrain.models.loading import load_pretrained_model

    ref = load_pretrained_model(MODEL)
    before = [p.detach().clone() for p in ref.parameters()]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4,
                     learning_rate=1e-2, report_to="none", save_strategy="no", max_length=64,
                     ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    trainer = DPOTrainer(MODEL, args=args, train_dataset=_data("posttrain/arith-pref"))
    trainer.add_callback(SyncRefModelCallback(ref, trainer.accelerator))
    trainer.train()
    policy = list(trainer.model.parameters())
    # one sync at step 2: ref = ½·policy + ½·ref_before
    for p, r, b in zip(policy, ref.parameters(), before):
        torch.testing.assert_close(r.detach(), 0.5 * p.detach().cpu() + 0.5 * b)


def test_log_completions_callback(tmp_path):
    from transformers import GenerationConfig

    from posttrain import LogCompletionsCallback, SFTTrainer

    trainer = SFTTrainer(MODEL, args=_sft_args(tmp_path, max_steps=2),
                         train_dataset=_data("posttrain/arith-sft", config="conversational"),
                         eval_dataset=_data("posttrain/arith-sft", n=4, config="conversational"))
    with pytest.raises(ValueError, match="evaluation dataset"):
        LogCompletionsCallback(types.SimpleNamespace(eval_dataset=None))
    callback = LogCompletionsCallback(trainer, GenerationConfig(max_new_tokens=4, do_sample=False), num_prompts=2,
                                      freq=1)
    trainer.add_callback(callback)
    trainer.train()
    assert [row[0] for row in callback.table] == ["1", "1", "2", "2"]
    assert all("<|im_start|>user" in prompt for _, prompt, _ in callback.table)
    lines = open(os.path.join(trainer.args.output_dir, "logged_completions.jsonl")).read().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {"step", "prompt", "completion"}


def test_merge_model_callback_linear(tmp_path):
    from posttrain import MergeConfig, MergeModelCallback, SFTTrainer
    from posttrain.models.loading import load_pretrained_model

    with pytest.raises(UserError, match="mergekit"):
        MergeConfig("ties")
    trainer = SFTTrainer(MODEL, args=_sft_args(tmp_path, max_steps=2), train_dataset=_data("posttrain/arith-sft"),
                         callbacks=[MergeModelCallback(MergeConfig("linear"))])
    trainer.train()
    out = os.path.join(trainer.args.output_dir, "merged")
    merged, base = load_pretrained_model(out, dtype="float32"), load_pretrained_model(MODEL)
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "layers.0" in n and p.dim() == 2)
    expected = 0.5 * param.detach().cpu() + 0.5 * dict(base.named_parameters())[name].detach()
    torch.testing.assert_close(dict(merged.named_parameters())[name].detach(), expected, atol=2e-3, rtol=2e-3)
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_slerp_merge_tensor():
    from posttrain import MergeConfig

    config = MergeConfig("slerp")
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(config.merge_tensor(a, b).float(), torch.tensor([math.sqrt(0.5)] * 2))
    config.t_values = 1.0
    torch.testing.assert_close(config.merge_tensor(a, b).float(), a)


# ---- module paths ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,name", [
    ("posttrain.trainer.sft_trainer", "SFTTrainer"), ("posttrain.trainer.sft_trainer", "DataCollatorForLanguageModeling"),
    ("posttrain.trainer.dpo_trainer", "DPOTrainer"), ("posttrain.trainer.dpo_config", "DPOConfig"),
    ("posttrain.trainer.grpo_trainer", "GRPOTrainer"), ("posttrain.trainer.rloo_config", "RLOOConfig"),
    ("posttrain.trainer.kto_trainer", "KTOTrainer"), ("posttrain.trainer.reward_trainer", "RewardTrainer"),
    ("posttrain.trainer.model_config", "ModelConfig"), ("posttrain.trainer.callbacks", "BEMACallback"),
    ("posttrain.trainer.utils", "get_peft_config"), ("posttrain.trainer", "SFTConfig"),
    ("posttrain.experimental.orpo", "ORPOTrainer"), ("posttrain.experimental.orpo", "ORPOConfig"),
    ("posttrain.experimental.cpo.cpo_trainer", "CPOTrainer"), ("posttrain.experimental.kto", "KTOTrainer"),
    ("posttrain.experimental.online_dpo", "OnlineDPOTrainer"),
    ("posttrain.experimental.merge_model_callback", "MergeModelCallback"),
    ("posttrain.rewards.accuracy_rewards", "accuracy_reward"), ("posttrain.rewards.other_rewards",
                                                                "get_soft_overlong_punishment"),
    ("posttrain.scripts.utils", "TrlParser"), ("posttrain.scripts.utils", "ScriptArguments"),
    ("posttrain.chat_template_utils", "clone_chat_template"), ("posttrain.data_utils", "apply_chat_template"),
])
def test_trl_module_paths(path, name):
    import posttrain

    module = importlib.import_module(path)
    value = getattr(module, name)
    if hasattr(posttrain, name):
        assert value is getattr(posttrain, name)
    if path != "posttrain.data_utils":
        assert name in module.__all__


def test_alias_errors_name_what_is_missing(monkeypatch):
    from posttrain.compat.module_aliases import ALIASES

    module = importlib.import_module("posttrain.trainer.sft_trainer")
    with pytest.raises(AttributeError, match="trl.trainer.sft_trainer"):
        module.NoSuchThing  # noqa: B018
    # a path whose posttrain modules are not in this install is not importable, and says so
    monkeypatch.setitem(ALIASES, "posttrain.experimental.nothing", ("posttrain.trainers.nothing",))
    with pytest.raises(ModuleNotFoundError, match="no counterpart of TRL's trl.experimental.nothing"):
        importlib.import_module("posttrain.experimental.nothing")
    # GKD lives beside distillation (trainers/distillation.py): TRL's three paths resolve there
    import posttrain

    for path in ("posttrain.experimental.gkd", "posttrain.experimental.gkd.gkd_trainer"):
        assert importlib.import_module(path).GKDTrainer is posttrain.GKDTrainer
    assert importlib.import_module("posttrain.experimental.gkd.gkd_config").GKDConfig is posttrain.GKDConfig


# ---- the checklist ---------------------------------------------------------------------------------------------

def test_trl_compat_checklist_is_up_to_date():
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("trl_surface", os.path.join(ROOT, "benchmarks", "trl_surface.py"))
    surface = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(surface)
    committed = open(os.path.join(ROOT, "docs", "TRL-COMPAT.md")).read()
    assert surface.render() == committed, ("docs/TRL-COMPAT.md is out of date: run "
                                           "`python benchmarks/trl_surface.py` and commit the result.")


def test_cli_ignore_bias_buffers(tmp_path):
    from posttrain.cli import run_training

    trainer = run_training("sft", ["--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-sft",
                                   "--dataset_train_split", "train[:8]", "--max_steps", "1", "--report_to", "none",
                                   "--save_strategy", "no", "--output_dir", str(tmp_path / "cli"),
                                   "--ignore_bias_buffers", "True"])
    bool_buffers = [n for n, b in trainer.model.named_buffers() if b.dtype == torch.bool]
    assert trainer.model._ddp_params_and_buffers_to_ignore == bool_buffers
