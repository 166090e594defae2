"""LoRA adapters: no reference copy when adapters are trained (every reference-anchored trainer), a model given with
an adapter trains it against a frozen copy of that adapter, saved adapters reload and merge, QLoRA is refused
without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.data.arith import load_builtin_dataset
from posttrain.models import adapters
from posttrain.models.builtin import builtin_model_path

MODEL = "posttrain/tiny"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", seed=0, **kw)


def _trainer(name, tmp_path, model=MODEL, peft_config=None):
    prompts = load_builtin_dataset("posttrain/arith-prompts", split="train[:16]")
    pairs = load_builtin_dataset("posttrain/arith-pref", split="train[:16]")
    online = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=4)
    if name == "dpo":
        from posttrain import DPOConfig, DPOTrainer

        return DPOTrainer(model, args=DPOConfig(**_common(tmp_path, per_device_train_batch_size=4, max_length=64)),
                          train_dataset=pairs, peft_config=peft_config)
    if name == "kto":
        from posttrain import KTOConfig, KTOTrainer

        return KTOTrainer(model, args=KTOConfig(**_common(tmp_path, per_device_train_batch_size=4, max_length=64)),
                          train_dataset=load_builtin_dataset("posttrain/arith-kto", split="train[:16]"),
                          peft_config=peft_config)
    if name == "grpo":
        from posttrain import GRPOConfig, GRPOTrainer

        return GRPOTrainer(model, reward_funcs="length_reward", args=GRPOConfig(**_common(tmp_path, beta=0.1,
                           **online)), train_dataset=prompts, peft_config=peft_config)
    if name == "rloo":
        from posttrain import RLOOConfig, RLOOTrainer

        return RLOOTrainer(model, reward_funcs="length_reward", args=RLOOConfig(**_common(tmp_path, beta=0.1,
                           **online)), train_dataset=prompts, peft_config=peft_config)
    if name == "online_dpo":
        from posttrain import OnlineDPOConfig, OnlineDPOTrainer

        return OnlineDPOTrainer(model, reward_funcs="length_reward", args=OnlineDPOConfig(**_common(tmp_path,
                                **online)), train_dataset=prompts, peft_config=peft_config)
    from posttrain import PPOConfig, PPOTrainer

    online.pop("num_generations")
    return PPOTrainer(model, reward_funcs="length_reward", args=PPOConfig(**_common(tmp_path, **online)),
                      train_dataset=prompts, peft_config=peft_config)


@pytest.mark.parametrize("name", ["dpo", "kto", "grpo", "rloo", "online_dpo", "ppo"])
def test_lora_keeps_no_reference_copy(tmp_path, name):
    trainer = _trainer(name, tmp_path, peft_config=LoraConfig(**LORA))
    assert trainer.ref_model is None
    # one copy of the base weights in memory: every module that holds weights belongs to the trained model
    policy = trainer.model.policy if name == "ppo" else trainer.model
    assert isinstance(policy, PeftModel) and not adapters.has_reference_adapter(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _adapted_model():
    """The tiny model with a LoRA adapter whose B matrices are non-zero (so the adapter changes the outputs)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_path(MODEL)), LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


def test_given_adapter_is_the_frozen_reference(tmp_path):
    model = _adapted_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = _trainer("dpo", tmp_path, model=model)
    assert trainer.ref_model is None and adapters.has_reference_adapter(model)
    trainer.args.max_steps = 2
    trainer.train()
    # policy = reference at the first step (the adapter as given, not the base with adapters off): loss = log 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert trainer.state.log_history[1]["loss"] != pytest.approx(math.log(2), abs=1e-5)
    params = dict(model.named_parameters())
    for name, value in start.items():
        ref_name = name.replace(".default.", f".{adapters.REFERENCE_ADAPTER}.")
        assert torch.equal(params[ref_name], value) and not params[ref_name].requires_grad
    assert any(not torch.equal(params[n], v) for n, v in start.items() if "lora_B" in n)  # the trained one moved
    assert model.active_adapter == "default"


def test_saved_adapter_reloads_trains_and_merges(tmp_path, capsys):
    adapter_dir = tmp_path / "adapter"
    model = _adapted_model()
    model.save_pretrained(adapter_dir)
    model.peft_config["default"].base_model_name_or_path = MODEL
    model.peft_config["default"].save_pretrained(adapter_dir)  # names the built-in base
    # loaded by directory name: a trainable PeftModel whose own adapter is the reference
    trainer = _trainer("grpo", tmp_path, model=str(adapter_dir))
    assert isinstance(trainer.model, PeftModel) and adapters.has_reference_adapter(trainer.model)
    trainer.train()
    assert trainer.state.log_history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # posttrain merge: full weights that reproduce the adapted model
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model.eval()(ids).logits, atol=1e-4)
    assert main(["merge", "--adapter", str(tmp_path), "--output_dir", str(merged_dir)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_cli_lora_with_merged_copy(tmp_path):
    out = tmp_path / "run"
    assert main(["sft", "--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-sft", "--output_dir",
                 str(out), "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
                 "--use_peft", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
                 "--lora_target_modules", "q_proj", "v_proj", "--use_rslora", "True",
                 "--merge_adapters", "True"]) == 0
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "merged" / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantised_loading_refused_without_cuda(tmp_path, capsys, flag):
    assert main(["sft", "--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-sft", "--output_dir",
                 str(tmp_path / "q"), "--use_peft", "True", flag, "True"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "need a CUDA GPU" in err
