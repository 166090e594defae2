"""GGUF in and out on tiny GGUF files the tests write themselves (no download): export → transformers reads it back
with the same logits (f32 exactly; f16, q8_0 within their rounding) and the same tokenizer; `x.gguf` and
directory + `gguf_file` load for training and save as plain safetensors; the llama rotary reordering; the
pre-tokenizer names; the CLI; one-line errors (no gguf package, unreadable or unexportable architecture)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from posttrain.cli import main as cli_main
from posttrain.models import gguf as gguf_in
from posttrain.models import loading
from posttrain.models.gguf_export import export_gguf, interleave_rotary_rows
from posttrain.models.gguf_vocab import pre_tokenizer_name

TEXT = "Question: Mia has 17 apples and buys 5 more. How many apples does Mia have now?\nAnswer: 17 + 5 = 22"
# max |Δ logit| / max |logit| after a round trip; measured 0 / 3.8e-4 / 6.8e-3 (tiny) and 0 / 3.5e-4 / 9.9e-3
# (tiny-llama); SmolLM2-135M: 0 / 9.1e-4 / 1.8e-2 (README)
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "q8_0": 3e-2}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", ["posttrain/tiny", "posttrain/tiny-llama"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_round_trip_logits_and_tokenizer(tiny_gguf, name, outtype):
    path = tiny_gguf(name, outtype)
    model, tok = loading.load_pretrained_model(name), loading.load_tokenizer(name)
    back, back_tok = loading.load_pretrained_model(path), loading.load_tokenizer(path)
    ids = tok(TEXT)["input_ids"]
    assert back_tok(TEXT)["input_ids"] == ids
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.eos_token, back_tok.pad_token) == (tok.eos_token, tok.pad_token)
    ref, got = _logits(model, ids), _logits(back, ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[outtype]
    assert back.config._name_or_path == path and "quantization_config" not in back.config.to_dict()


def test_file_types_and_sizes(tiny_gguf):
    sizes = {t: os.path.getsize(tiny_gguf("posttrain/tiny", t)) for t in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > 1.9 * sizes["f16"] > 1.9 * 1.7 * sizes["q8_0"]
    reader = gguf.GGUFReader(tiny_gguf("posttrain/tiny", "q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.bias"] == "F32" and "output.weight" not in types  # tied: no lm_head written
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.ggml.", "qwen2."))}
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["qwen2.block_count"] == 2 and fields["qwen2.attention.head_count_kv"] == 2


def test_interleave_rotary_rows_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8, 3 inputs
    interleaved = interleave_rotary_rows(weight, n_heads=2)
    assert interleaved[:4, 0].tolist() == [0, 12, 3, 15]  # head 0: rows 0, 4, 1, 5 (pairs j, d/2 + j)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 2, "num_key_value_heads": 2})
    back = processor.process(interleaved, "blk.0.attn_q.weight").weights
    assert np.array_equal(back, weight)


def test_pre_tokenizer_names():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert pre_tokenizer_name(backend) == "gpt-2"
    gguf_in.fix_pre_tokenizer(type("T", (), {"backend_tokenizer": backend})(), "smollm")
    assert pre_tokenizer_name(backend) == "smollm"
    assert pre_tokenizer_name(loading.load_tokenizer("posttrain/tiny").backend_tokenizer) == "qwen2"
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert pre_tokenizer_name(backend) == "default"


def test_sft_from_gguf_file_saves_plain_safetensors(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain import SFTConfig, SFTTrainer
    from posttrain.data.arith import load_builtin_dataset

    path = tiny_gguf()
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_length=96,
                     learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(path, args=args,
                         train_dataset=load_builtin_dataset("posttrain/arith-sft", "conversational", split="train[:8]"))
    assert trainer.processing_class.chat_template and trainer.model.dtype == torch.float32
    trainer.train()
    trainer.save_model(args.output_dir)
    files = os.listdir(args.output_dir)
    assert "model.safetensors" in files and "tokenizer.json" in files and not any(f.endswith(".gguf") for f in files)
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    saved = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert torch.equal(saved.model.norm.weight, trainer.model.model.norm.weight)


def test_directory_plus_gguf_file_and_reward_head(tiny_gguf):
    from transformers import AutoModelForSequenceClassification

    path = tiny_gguf()
    model = loading.load_pretrained_model(os.path.dirname(path), gguf_file=os.path.basename(path), dtype="bfloat16"
                                          if torch.cuda.is_available() else "float32")
    assert model.config._name_or_path == path
    reward = loading.load_pretrained_model(path, AutoModelForSequenceClassification, num_labels=1)
    assert reward.score.weight.shape == (1, 128) and not reward.score.weight.is_meta


def test_cli_train_from_gguf_then_export_lora_run(tiny_gguf, tmp_path):
    out, exported = tmp_path / "run", tmp_path / "run.gguf"
    assert cli_main(["sft", "--model_name_or_path", tiny_gguf(), "--dataset_name", "posttrain/arith-sft",
                     "--dataset_config", "conversational", "--max_steps", "2", "--per_device_train_batch_size", "4",
                     "--max_length", "96", "--learning_rate", "1e-2", "--use_peft", "True", "--lora_r", "4",
                     "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no"]) == 0
    assert (out / "adapter_config.json").exists()
    assert cli_main(["export", str(out), "--gguf", str(exported), "--outtype", "f32"]) == 0
    from posttrain.export import load_for_export

    merged, tok = load_for_export(str(out))
    ids = tok(TEXT)["input_ids"]
    ref = _logits(merged, ids)
    base = _logits(loading.load_pretrained_model(tiny_gguf()), ids)
    assert (ref - base).abs().max() > 1e-4  # the adapter changed the model, and the export carries the change
    assert torch.allclose(_logits(loading.load_pretrained_model(str(exported)), ids), ref, atol=1e-5, rtol=0)


def test_one_line_errors(tiny_gguf, tmp_path, monkeypatch, capsys):
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "rwkv7")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"GGUF architecture 'rwkv7' .* cannot be read by transformers .*readable: "):
        loading.load_pretrained_model(str(odd))
    with pytest.raises(ValueError, match="does not exist"):
        loading.load_pretrained_model(str(tmp_path / "missing.gguf"))
    assert cli_main(["export", "posttrain/tiny", "--gguf", str(tmp_path / "x.gguf"), "--outtype", "q4"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    from transformers import AutoModelForSequenceClassification

    reward_dir = tmp_path / "reward"
    loading.load_pretrained_model("posttrain/tiny", AutoModelForSequenceClassification, num_labels=1) \
        .save_pretrained(reward_dir)
    loading.load_tokenizer("posttrain/tiny").save_pretrained(reward_dir)
    assert cli_main(["export", str(reward_dir), "--gguf", str(tmp_path / "r.gguf")]) == 2
    assert "reward or value model" in capsys.readouterr().err
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="supports the llama and qwen2 architectures; this model is 'gpt2'"):
        export_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=4096)),
                    loading.load_tokenizer("posttrain/tiny"), str(tmp_path / "g.gguf"))
    path = tiny_gguf()
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: `import gguf` raises ImportError
    with pytest.raises(ValueError, match=r"needs the gguf package: pip install 'posttrain\[gguf\]'"):
        loading.load_pretrained_model(path)
    assert cli_main(["export", "posttrain/tiny", "--gguf", str(tmp_path / "y.gguf")]) == 2
    assert "pip install 'posttrain[gguf]'" in capsys.readouterr().err
    assert not any(p.name.endswith((".tmp",)) for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["dpo", "reward", "ppo"])
def test_trainers_that_load_more_models_from_the_gguf(tiny_gguf, tmp_path, command):
    """DPO reloads its reference, reward adds a score head, PPO builds a critic and a reference: all from the file."""
    from posttrain.cli import COMMANDS, _load
    from posttrain.data.arith import load_builtin_dataset

    data = {"dpo": "posttrain/arith-pref", "reward": "posttrain/arith-pref", "ppo": "posttrain/arith-prompts"}
    options = dict(max_completion_length=8) if command == "ppo" else dict(max_length=96)
    args = _load(COMMANDS[command][0])(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                       report_to="none", save_strategy="no", **options)
    extra = {"reward_funcs": lambda completions, **kw: [float(len(c)) for c in completions]} if command == "ppo" else {}
    trainer = _load(COMMANDS[command][1])(tiny_gguf(), args=args, train_dataset=load_builtin_dataset(
        data[command], "conversational", split="train[:4]"), **extra)
    trainer.train()
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
