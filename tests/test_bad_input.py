"""Bad input → one clear line that names what was wrong and how to fix it, through the Python API and the CLI.

API cases assert the exception type and a one-line message naming the problem and the fix. CLI cases run
`posttrain.cli.main` in-process: exit status 2, stderr exactly one line `posttrain <cmd>: error: …`, no
traceback (two cases run the real command in a subprocess). Nothing a failed command does may touch an existing
output directory.
"""

import os
import re
import subprocess
import sys

import datasets
import pytest
import yaml

from posttrain.cli import main
from posttrain.configs.cpo import CPOConfig
from posttrain.configs.dpo import DPOConfig
from posttrain.configs.grpo import GRPOConfig
from posttrain.configs.kto import KTOConfig
from posttrain.configs.online_dpo import OnlineDPOConfig
from posttrain.configs.ppo import PPOConfig
from posttrain.configs.rloo import RLOOConfig
from posttrain.configs.sft import SFTConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.data.loading import load_any_dataset
from posttrain.errors import RewardFunctionError
from posttrain.models.loading import load_pretrained_model, load_tokenizer
from posttrain.trainers.dpo import DPOTrainer
from posttrain.trainers.grpo import GRPOTrainer
from posttrain.trainers.kto import KTOTrainer
from posttrain.trainers.sft import SFTTrainer

MODEL = "posttrain/tiny"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress bars on stderr, so the CLI's error is the only line there."""
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


def _data(name, config=None, n=8):
    return load_builtin_dataset(f"posttrain/{name}", config, split=f"train[:{n}]")


def _kw(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, per_device_train_batch_size=2,
                save_strategy="no", **kw)


def _sft(tmp_path, data, processing_class=None, **kw):
    return SFTTrainer(MODEL, args=SFTConfig(**_kw(tmp_path, **kw)), train_dataset=data,
                      processing_class=processing_class)


def _dpo(tmp_path, data, processing_class=None, **kw):
    return DPOTrainer(MODEL, args=DPOConfig(**_kw(tmp_path, **kw)), train_dataset=data,
                      processing_class=processing_class)


def _kto(tmp_path, data, **kw):
    return KTOTrainer(MODEL, args=KTOConfig(**_kw(tmp_path, **kw)), train_dataset=data)


def _grpo(tmp_path, data, reward_funcs="accuracy_reward", processing_class=None, **kw):
    kw = {"num_generations": 2, "max_completion_length": 4, **kw}
    return GRPOTrainer(MODEL, reward_funcs=reward_funcs, args=GRPOConfig(**_kw(tmp_path, **kw)), train_dataset=data,
                       processing_class=processing_class)


def _rows(**columns):
    return datasets.Dataset.from_dict(columns)


def _no_template():
    tok = load_tokenizer(MODEL)
    tok.chat_template = None
    return tok


def _raises(completions, **kwargs):
    raise KeyError("answer_x")


def _short(completions, **kwargs):
    return [1.0]


def _nan(completions, **kwargs):
    return [float("nan")] * len(completions)


def _none(completions, **kwargs):
    return [None] * len(completions)


def _mixed_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    (folder / "b.csv").write_text("text\nb\n")
    return str(folder)


def _self_reference(tmp_path):
    policy = load_pretrained_model(MODEL)  # the same object as policy and reference would train nothing
    return DPOTrainer(policy, ref_model=policy, args=DPOConfig(**_kw(tmp_path)), train_dataset=_data("arith-pref"))


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


# (id, call(tmp_path), exception type, regex the one-line message must match)
API_CASES = [
    # missing or misnamed columns: the expected columns are named, near misses suggested
    ("sft-misnamed-text", lambda p: _sft(p, _data("arith-lm").rename_column("text", "txt")), ValueError,
     r"SFTTrainer expects a dataset with columns 'text' or 'messages' or 'prompt' \+ 'completion'.*'txt' → 'text'"),
    ("sft-missing-prompt", lambda p: _sft(p, _data("arith-sft").rename_column("prompt", "question")), ValueError,
     r"expects a dataset with columns .*'prompt' \+ 'completion'; got columns \['question'.*rename_column"),
    ("dpo-missing-rejected", lambda p: _dpo(p, _data("arith-pref").remove_columns("rejected")), ValueError,
     r"DPOTrainer expects a dataset with columns 'prompt' \+ 'chosen' \+ 'rejected'.*rename_column"),
    ("kto-misnamed-label", lambda p: _kto(p, _data("arith-kto").rename_column("label", "labels")), ValueError,
     r"KTOTrainer expects .*'prompt' \+ 'completion' \+ 'label'.*'labels' → 'label'"),
    ("grpo-misnamed-prompt", lambda p: _grpo(p, _data("arith-prompts").rename_column("prompt", "query")),
     ValueError, r"GRPOTrainer expects a dataset with columns 'prompt'; got columns \['query'"),
    # a column of the wrong type
    ("sft-int-prompt", lambda p: _sft(p, _rows(prompt=[1, 2], completion=["a", "b"])), ValueError,
     r"Column 'prompt' must hold strings or lists of messages, got int .*Convert it"),
    ("dpo-int-prompt", lambda p: _dpo(p, _rows(prompt=[1, 2], chosen=["a", "b"], rejected=["c", "d"])), ValueError,
     r"Column 'prompt' must hold strings or lists of messages, got int .*Convert it"),
    ("grpo-int-prompt", lambda p: _grpo(p, _rows(prompt=[1, 2, 3, 4])), ValueError,
     r"Column 'prompt' of the train dataset must hold strings or lists of messages, got int64 .*Convert it"),
    ("kto-string-label", lambda p: _kto(p, _rows(prompt=["a", "b"], completion=["x", "y"], label=["yes", "no"])),
     ValueError, r"Column 'label' must hold booleans .*got 'yes'. Convert it"),
    # an empty dataset
    ("sft-empty", lambda p: _sft(p, _data("arith-sft").select([])), ValueError,
     r"The train dataset is empty; give at least one example"),
    ("dpo-empty", lambda p: _dpo(p, _data("arith-pref").select([])), ValueError, r"train dataset is empty"),
    ("kto-empty", lambda p: _kto(p, _data("arith-kto").select([])), ValueError, r"train dataset is empty"),
    ("grpo-empty", lambda p: _grpo(p, _data("arith-prompts").select([])), ValueError,
     r"The train dataset is empty; give at least one prompt"),
    # rows with None or empty strings
    ("sft-none-prompt", lambda p: _sft(p, _rows(prompt=["a", None], completion=["b", "c"])), ValueError,
     r"A row has an empty or missing 'prompt' .*dataset\.filter\(lambda ex: ex\['prompt'\]\)"),
    ("sft-empty-text", lambda p: _sft(p, _rows(text=["a", ""])), ValueError,
     r"A row has an empty or missing 'text' .*Remove such rows"),
    ("dpo-none-chosen", lambda p: _dpo(p, _rows(prompt=["a", "b"], chosen=["x", None], rejected=["c", "d"])),
     ValueError, r"A row has an empty or missing 'chosen' .*Remove such rows"),
    ("kto-empty-completion", lambda p: _kto(p, _rows(prompt=["a", "b"], completion=["x", ""], label=[True, False])),
     ValueError, r"A row has an empty or missing 'completion' .*Remove such rows"),
    ("grpo-empty-prompt", lambda p: _grpo(p, _rows(prompt=["2 + 2 =", ""])), ValueError,
     r"Row 1 of the train dataset has an empty or missing 'prompt' .*Remove such rows"),
    # every example longer than max_length
    ("sft-all-too-long", lambda p: _sft(p, _data("arith-sft"), max_length=2), ValueError,
     r"Every train example was dropped \(no trainable token left after truncation to max_length=2\)\. Raise max_length"),
    ("dpo-all-too-long", lambda p: _dpo(p, _data("arith-pref"), max_length=3), ValueError,
     r"Every train example was dropped \(prompt fills max_length=3\)\. Raise max_length"),
    # an unknown loss_type: the valid ones are listed
    ("sft-loss-type", lambda p: SFTConfig(**_kw(p, loss_type="nllx")), ValueError,
     r"Unknown loss_type 'nllx' for SFT; choose one of: nll, dft"),
    ("dpo-loss-type", lambda p: DPOConfig(**_kw(p, loss_type="sigmoidd")), ValueError,
     r"Unknown loss_type 'sigmoidd' for DPO; choose from: sigmoid, hinge"),
    ("cpo-loss-type", lambda p: CPOConfig(**_kw(p, loss_type="simpoo")), ValueError,
     r"Unknown loss_type 'simpoo' for CPO; choose one of: .*simpo"),
    ("kto-loss-type", lambda p: KTOConfig(**_kw(p, loss_type="ktoo")), ValueError,
     r"Unknown loss_type 'ktoo' for KTO; choose one of: kto"),
    ("grpo-loss-type", lambda p: GRPOConfig(**_kw(p, loss_type="grpoo", num_generations=2)), ValueError,
     r"Unknown loss_type 'grpoo' for GRPO; choose one of: grpo"),
    # invalid values
    ("negative-beta", lambda p: DPOConfig(**_kw(p, beta=-0.1)), ValueError, r"beta must be > 0, got -0\.1"),
    ("negative-learning-rate", lambda p: SFTConfig(**_kw(p, learning_rate=-1e-5)), ValueError,
     r"learning_rate must be > 0, got -1e-05"),
    ("zero-learning-rate", lambda p: DPOConfig(**_kw(p, learning_rate=0)), ValueError,
     r"learning_rate must be > 0, got 0"),
    ("num-generations-not-dividing", lambda p: GRPOConfig(**_kw(p, num_generations=3, generation_batch_size=4)),
     ValueError, r"generation batch .* = 4\) must be a multiple of num_generations \(3\)"),
    ("num-generations-one", lambda p: GRPOConfig(**_kw(p, num_generations=1)), ValueError,
     r"num_generations must be >= 2 .*got 1"),
    ("epsilon-zero", lambda p: GRPOConfig(**_kw(p, num_generations=2, epsilon=0.0)), ValueError,
     r"epsilon must be > 0, got 0\.0"),
    ("vllm-not-installed", lambda p: _grpo(p, _data("arith-prompts"), num_generations=2, use_vllm=True),
     ValueError,
     r"use_vllm=True needs the vllm package \(pip install 'posttrain\[vllm\]'\)"),
    ("label-smoothing-half", lambda p: DPOConfig(**_kw(p, label_smoothing=0.5)), ValueError,
     r"label_smoothing must be in \[0, 0\.5\), got 0\.5"),
    ("dpo-prompt-length", lambda p: DPOConfig(**_kw(p, max_prompt_length=64, max_length=64)), ValueError,
     r"max_prompt_length \(64\) must be smaller than max_length \(64\)"),
    ("cpo-prompt-length", lambda p: CPOConfig(**_kw(p, max_prompt_length=128, max_length=64)), ValueError,
     r"max_prompt_length \(128\) must be smaller than max_length \(64\)"),
    # models and tokenizers
    ("model-path-missing", lambda p: SFTTrainer(str(p / "no-model"), args=SFTConfig(**_kw(p))), ValueError,
     r"Model path '.*no-model' does not exist\. Give a local directory with config\.json"),
    ("model-dir-without-config", lambda p: SFTTrainer(str(p), args=SFTConfig(**_kw(p))), ValueError,
     r"Model directory '.*' has no config\.json\. Give a directory written by save_pretrained"),
    ("unknown-builtin-model", lambda p: SFTTrainer("posttrain/tinyy", args=SFTConfig(**_kw(p))), ValueError,
     r"Unknown built-in model 'posttrain/tinyy'; available: posttrain/tiny"),
    ("no-pad-no-eos", lambda p: _sft(p, _data("arith-sft"), processing_class=_tokenizer(pad=None, eos=None)),
     ValueError, r"neither a pad nor an EOS token; set pad_token="),
    # conversational data with a tokenizer that has no chat template
    ("sft-no-chat-template", lambda p: _sft(p, _data("arith-sft", "conversational"), _no_template()), ValueError,
     r"Conversational data needs a tokenizer with a chat template.*Set chat_template_path"),
    ("dpo-no-chat-template", lambda p: _dpo(p, _data("arith-pref", "conversational"), _no_template()), ValueError,
     r"Conversational data needs a tokenizer with a chat template.*Set chat_template_path"),
    ("grpo-no-chat-template", lambda p: _grpo(p, _data("arith-prompts", "conversational"),
                                              processing_class=_no_template()),
     ValueError, r"Conversational data needs a tokenizer with a chat template.*Set chat_template_path"),
    # reward functions that misbehave, through GRPOTrainer.train
    ("reward-raises", lambda p: _grpo(p, _data("arith-prompts"), _raises).train(), RewardFunctionError,
     r"^reward function '_raises' raised KeyError: 'answer_x'$"),
    ("reward-wrong-length", lambda p: _grpo(p, _data("arith-prompts"), _short).train(), ValueError,
     r"reward function '_short' returned 1 values for 2 completions; it must return exactly one value"),
    ("reward-nan", lambda p: _grpo(p, _data("arith-prompts"), _nan).train(), ValueError,
     r"^reward function '_nan' returned NaN for all \d+ completions of this batch; fix the function, or return None"),
    # an output_dir that cannot be written (checked before the model loads)
    ("output-dir-parent-is-file", lambda p: SFTTrainer(MODEL, args=SFTConfig(**{
        **_kw(p), "output_dir": str(_file(p) / "out")}), train_dataset=_data("arith-sft")), NotADirectoryError,
     r"output_dir '.*a_file/out' cannot be used: '.*a_file' is a file, not a directory\. Choose another output_dir"),
    ("output-dir-is-file", lambda p: DPOTrainer(MODEL, args=DPOConfig(**{**_kw(p), "output_dir": str(_file(p))}),
                                                train_dataset=_data("arith-pref")), NotADirectoryError,
     r"output_dir '.*a_file' cannot be used: it is a file\. Choose another output_dir"),
    # settings that would be accepted and ignored, or run and do nothing
    ("max-steps-zero", lambda p: SFTConfig(**{**_kw(p), "max_steps": 0}), ValueError,
     r"max_steps is 0: nothing would be trained\. Give a positive number .* or -1"),
    ("accumulation-zero", lambda p: SFTConfig(**_kw(p, gradient_accumulation_steps=0)), ValueError,
     r"gradient_accumulation_steps must be >= 1, got 0"),
    ("fp16-on-cpu", lambda p: DPOConfig(**_kw(p, fp16=True)), ValueError, r"fp16=True needs a CUDA GPU"),
    ("report-to-not-installed", lambda p: SFTConfig(**{**_kw(p), "report_to": "comet_ml"}), ValueError,
     r"report_to='comet_ml' needs the comet_ml package, which is not installed"),
    ("warmup-ratio-above-one", lambda p: SFTConfig(**_kw(p, warmup_ratio=5)), ValueError,
     r"warmup_ratio must be in \[0, 1\) .* got 5; for a number of steps use warmup_steps"),
    ("sibling-option", lambda p: GRPOConfig(**_kw(p, kl_coef=0.1)), TypeError,
     r"GRPOConfig has no option 'kl_coef': it is used by PPOTrainer only"),
    ("policy-as-its-own-reference", _self_reference, ValueError, r"got the policy itself as ref_model"),
    ("rewards-all-none", lambda p: _grpo(p, _data("arith-prompts"), _none).train(), ValueError,
     r"No reward function scored any of the \d+ completions of this batch \(every one returned None or NaN: _none\)"),
    ("mixed-format-data-folder", lambda p: load_any_dataset(_mixed_folder(p), split="train"), ValueError,
     r"Dataset folder '.*data' holds files of several formats \(\.csv, \.jsonl\); only one would be read"),
    # the online configs' own checks (one line each, raised when the config is built)
    ("grpo-one-generation", lambda p: GRPOConfig(**_kw(p, num_generations=1)), ValueError,
     r"num_generations must be >= 2 \(a group needs siblings to compare\), got 1"),
    ("grpo-temperature-zero", lambda p: GRPOConfig(**_kw(p, temperature=0)), ValueError,
     r"temperature must be > 0, got 0"),
    ("grpo-entropy-quantile-zero", lambda p: GRPOConfig(**_kw(p, top_entropy_quantile=0)), ValueError,
     r"top_entropy_quantile must be in \(0, 1\], got 0"),
    ("grpo-loss-normalization", lambda p: GRPOConfig(**_kw(p, loss_normalization="local")), ValueError,
     r"loss_normalization must be one of global, trl, got 'local'"),
    ("grpo-epsilon-zero", lambda p: GRPOConfig(**_kw(p, epsilon=0)), ValueError, r"epsilon must be > 0, got 0"),
    ("grpo-generation-kwargs-not-json", lambda p: GRPOConfig(**_kw(p, generation_kwargs="{bad")), ValueError,
     r"generation_kwargs must be a JSON object, got '\{bad'"),
    ("grpo-server-url-scheme", lambda p: GRPOConfig(**_kw(p, use_vllm=True, vllm_mode="server",
                                                          vllm_server_base_url="ftp://x")), ValueError,
     r"vllm_server_base_url must start with http:// or https://, got 'ftp://x'"),
    ("grpo-generation-batch-and-steps", lambda p: GRPOConfig(**{**_kw(p), "per_device_train_batch_size": 4,
                                                              "generation_batch_size": 16, "steps_per_generation": 3}),
     ValueError, r"Set generation_batch_size or steps_per_generation, not both"),
    ("rloo-clip-range-one-number", lambda p: RLOOConfig(**_kw(p, reward_clip_range=[1.0])), ValueError,
     r"reward_clip_range needs two numbers \[low, high\], got \[1\.0\]"),
    ("rloo-one-generation", lambda p: RLOOConfig(**_kw(p, num_generations=1)), ValueError,
     r"num_generations must be >= 2 \(the baseline is the other completions of the prompt\)"),
    ("ppo-kl-estimator", lambda p: PPOConfig(**_kw(p, kl_estimator="k9")), ValueError,
     r"kl_estimator must be one of k1, k3, got 'k9'"),
    ("ppo-gamma-above-one", lambda p: PPOConfig(**_kw(p, gamma=2.0)), ValueError, r"gamma must be in \[0, 1\], got 2"),
    ("ppo-adaptive-kl-target-zero", lambda p: PPOConfig(**_kw(p, adaptive_kl=True, kl_target=0)), ValueError,
     r"adaptive_kl needs kl_target > 0 and kl_horizon > 0"),
    ("ppo-older-batch-size", lambda p: PPOConfig(**{**_kw(p), "per_device_train_batch_size": 2, "batch_size": 7}),
     ValueError, r"batch_size \(7\) must be a multiple of mini_batch_size × gradient_accumulation_steps \(2\)"),
    ("online-dpo-odd-batch", lambda p: OnlineDPOConfig(**{**_kw(p), "per_device_train_batch_size": 3}), ValueError,
     r"per_device_train_batch_size counts completions \(2 per prompt\) and must be even"),
    ("online-dpo-empty-beta", lambda p: OnlineDPOConfig(**_kw(p, beta=[])), ValueError,
     r"beta is an empty list; give one value"),
    ("model-init-kwargs-not-json", lambda p: SFTConfig(**_kw(p, model_init_kwargs="{bad")), ValueError,
     r"model_init_kwargs must be a JSON object, got '\{bad'"),
    ("encoder-decoder-model", lambda p: DPOTrainer(_tiny_t5(), args=DPOConfig(**_kw(p)), processing_class=_tokenizer(),
                                                    train_dataset=_data("arith-pref")),
     ValueError, r"DPOTrainer trains decoder-only language models and T5ForConditionalGeneration is an "
     r"encoder-decoder model \(T5, BART, …\): pass a causal LM"),
]


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=1))


def _tokenizer(pad="keep", eos="keep"):
    tok = load_tokenizer(MODEL)
    if pad is None:
        tok.pad_token = None
    if eos is None:
        tok.eos_token = None
    return tok


@pytest.mark.parametrize("call,error,pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(tmp_path, call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call(tmp_path)
    message = str(info.value)
    assert "\n" not in message.strip(), message


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    trainer = _sft(tmp_path, _data("arith-sft"), processing_class=_tokenizer(pad=None))
    tok = trainer.processing_class
    assert tok.pad_token == tok.eos_token and tok.pad_token_id is not None


def test_read_only_output_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permissions: let os.access answer as it would for another user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.path.abspath(path) == str(locked)
                            else real_access(path, mode, **kw))
    try:
        with pytest.raises(PermissionError, match=r"output_dir '.*locked/out' is not writable: .* read-only"):
            SFTTrainer(MODEL, args=SFTConfig(**{**_kw(tmp_path), "output_dir": str(locked / "out")}),
                       train_dataset=_data("arith-sft"))
    finally:
        locked.chmod(0o700)


# ---- the command line ------------------------------------------------------------------------------------------
def _base(tmp_path, dataset="posttrain/arith-sft"):
    return ["--model_name_or_path", MODEL, "--dataset_name", dataset, "--dataset_train_split", "train[:8]",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "True"]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _reward_file(tmp_path):
    return _write(tmp_path, "my_rewards.py", "def boom(completions, **kwargs):\n    raise KeyError('answer_x')\n")


CLI_CASES = [
    ("unknown-flag", lambda p: ["sft", "--lerning_rate", "1e-4"],
     r"unknown flag '--lerning_rate'; did you mean '--learning_rate'\?"),
    ("unknown-yaml-key", lambda p: ["dpo", "--config", _write(p, "c.yaml", "bta: 0.1\n")],
     r"unknown key 'bta' in .*c\.yaml; did you mean 'beta'\?"),
    ("malformed-yaml", lambda p: ["sft", "--config", _write(p, "bad.yaml", "learning_rate: [1e-4\n")],
     r"bad\.yaml is not valid YAML \(line 2, column 1\)"),
    ("yaml-not-a-mapping", lambda p: ["sft", "--config", _write(p, "list.yaml", "- 1\n- 2\n")],
     r"list\.yaml must hold a mapping of option: value, got list"),
    ("yaml-file-missing", lambda p: ["sft", "--config", str(p / "missing.yaml")],
     r"config file '.*missing\.yaml' not found"),
    ("unknown-command", lambda p: ["sfx"], r"unknown command 'sfx'; did you mean 'sft'\? \(commands: sft, dpo"),
    ("invalid-choice", lambda p: ["sft", "--loss_type", "nllx"],
     r"argument --loss_type.*: invalid choice: 'nllx' \(choose from .*nll.*dft"),
    ("not-a-number", lambda p: ["sft", "--learning_rate", "fast"],
     r"argument --learning_rate.*: invalid float value: 'fast' \(see --help\)"),
    ("negative-beta-flag", lambda p: ["dpo", "--beta", "-1"], r"beta must be > 0, got -1\.0"),
    ("unknown-loss-type-flag", lambda p: ["dpo", "--loss_type", "sigmoidd"],
     r"Unknown loss_type 'sigmoidd' for DPO; choose from: sigmoid"),
    ("num-generations-flag", lambda p: ["grpo", "--num_generations", "3", "--generation_batch_size", "8",
                                        "--per_device_train_batch_size", "4"],
     r"must be a multiple of num_generations \(3\)"),
    ("no-model", lambda p: ["sft", "--dataset_name", "posttrain/arith-sft"],
     r"no model: pass --model_name_or_path \(e\.g\. posttrain/tiny"),
    ("dataset-file-missing", lambda p: ["sft", *_base(p, str(p / "data.jsonl"))],
     r"Dataset path '.*data\.jsonl' does not exist\. Give an existing \.json/\.jsonl/\.csv/\.parquet file"),
    ("dataset-file-malformed", lambda p: ["sft", *_base(p, _write(p, "d.jsonl", '{"text": "a"}\n{"text": \n'))],
     r"Could not read dataset '.*d\.jsonl': JSON parse error.*Fix the data file"),
    ("unknown-builtin-dataset", lambda p: ["sft", *_base(p, "posttrain/arith-sftt")],
     r"Unknown built-in data set 'posttrain/arith-sftt'; available: posttrain/arith-lm"),
    ("unknown-split", lambda p: ["sft", *_base(p), "--dataset_train_split", "trian"],
     r"Unknown split 'trian'; available splits: train, test"),
    ("model-path-missing-cli", lambda p: ["sft", *_base(p), "--model_name_or_path", str(p / "nowhere")],
     r"Model path '.*nowhere' does not exist"),
    ("wrong-columns-cli", lambda p: ["dpo", *_base(p)],
     r"DPOTrainer expects a dataset with columns 'prompt' \+ 'chosen' \+ 'rejected'.*got columns \['prompt', "
     r"'completion'"),
    ("output-dir-not-writable-cli", lambda p: ["sft", *_base(p), "--output_dir", str(_file(p) / "out")],
     r"output_dir '.*a_file/out' cannot be used: '.*a_file' is a file, not a directory"),
    ("lora-option-without-use-peft", lambda p: ["sft", *_base(p), "--lora_r", "8"],
     r"--lora_r is set but use_peft is off, so it would have no effect .* add --use_peft True"),
    ("duplicate-yaml-key", lambda p: ["sft", "--config",
                                      _write(p, "d.yaml", "learning_rate: 1e-4\nlearning_rate: 2e-4\n")],
     r"d\.yaml is not valid YAML \(line 2, column 1\): key 'learning_rate' appears twice; keep one"),
    ("sibling-option-flag", lambda p: ["rloo", "--loss_type", "sapo"],
     r"unknown flag '--loss_type' for rloo: it is used by .*grpo.* only \(it would have no effect here\)"),
    ("max-steps-zero-flag", lambda p: ["sft", *_base(p), "--max_steps", "0"], r"max_steps is 0: nothing would be"),
    ("accumulation-zero-flag", lambda p: ["sft", *_base(p), "--gradient_accumulation_steps", "0"],
     r"gradient_accumulation_steps must be >= 1, got 0"),
    ("warmup-ratio-flag", lambda p: ["sft", *_base(p), "--warmup_ratio", "5"], r"warmup_ratio must be in \[0, 1\)"),
    ("generate-empty-prompt", lambda p: ["generate", "--model", MODEL, "--prompt", ""], r"--prompt is empty"),
    ("merge-into-a-file", lambda p: ["merge", "--adapter", str(p), "--output_dir", str(_file(p))],
     r"--output_dir '.*a_file' is a file, not a directory"),
    ("reward-model-is-a-language-model", lambda p: ["grpo", *_base(p, "posttrain/arith-prompts"), "--num_generations",
                                                    "2", "--max_completion_length", "4", "--reward_funcs", MODEL],
     r"'posttrain/tiny' is a language model \(Qwen2ForCausalLM\), not a reward model"),
    ("empty-data-file", lambda p: ["sft", *_base(p, _write(p, "empty.jsonl", ""))],
     r"Dataset file '.*empty\.jsonl' holds no examples \(it is empty or only blank lines\)"),
    ("blank-lines-data-file", lambda p: ["sft", *_base(p, _write(p, "blank.jsonl", "\n\n  \n"))],
     r"Dataset file '.*blank\.jsonl' holds no examples"),
    ("missing-relative-model-path", lambda p: ["generate", "--model", "outputs/not-trained-yet", "--prompt", "hi"],
     r"Model path 'outputs/not-trained-yet' does not exist\. Give a local directory"),
    ("message-content-null", lambda p: ["sft", *_base(p, _write(p, "m.jsonl", '{"messages": [{"role": "user", '
                                                                  '"content": null}, {"role": "assistant", '
                                                                  '"content": "4"}]}\n'))],
     r"Column 'messages': message 0 \(user\) has no content \(null or missing\)"),
    ("message-unknown-role", lambda p: ["sft", *_base(p, _write(p, "r.jsonl", '{"messages": [{"role": "robot", '
                                                                  '"content": "x"}]}\n'))],
     r"Column 'messages': message 0 has role 'robot'; use one of system, user, assistant"),
    ("list-of-strings-as-prompt", lambda p: ["sft", *_base(p, _write(p, "l.jsonl", '{"prompt": ["a", "b"], '
                                                                       '"completion": "x"}\n'))],
     r"Column 'prompt' holds a list whose entry 0 is a str \('a'\), not a \{'role', 'content'\} message"),
    ("completion-only-loss-on-plain-text", lambda p: ["sft", *_base(p, "posttrain/arith-lm"),
                                                      "--completion_only_loss", "True"],
     r"completion_only_loss=True needs prompt-completion data .*this train dataset is language modeling data"),
    ("assistant-only-loss-without-assistant-turns", lambda p: ["sft", *_base(p, _write(
        p, "u.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')), "--assistant_only_loss", "True"],
     r"Every train example was dropped \(no assistant turn to train on \(assistant_only_loss=True\)\)\. Give every "
     r"row an assistant turn"),
    ("missing-chat-template-file", lambda p: ["sft", *_base(p), "--chat_template_path", str(p / "nothere.jinja")],
     r"chat_template_path '.*nothere\.jinja' does not exist; give a \.jinja file"),
    ("reward-function-raises-cli", lambda p: ["grpo", *_base(p, "posttrain/arith-prompts"), "--num_generations", "2",
                                              "--max_completion_length", "4",
                                              "--reward_funcs", _reward_file(p) + ":boom"],
     r"reward function 'boom' raised KeyError: 'answer_x' \(--debug shows its traceback\)"),
]


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("make_argv,pattern", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(tmp_path, capsys, make_argv, pattern):
    argv = make_argv(tmp_path)
    code, err = _run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    command = argv[0]
    assert lines[0].startswith(f"posttrain {command}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def test_env_help_prints_help(capsys):
    assert main(["env", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: posttrain env")


def test_debug_shows_the_traceback(tmp_path):
    from posttrain.cli import CLIError

    with pytest.raises(CLIError, match="unknown flag"):
        main(["sft", "--lerning_rate", "1", "--debug"])


def test_failed_commands_leave_an_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    markers = {"model.safetensors": b"weights of an earlier run", "config.yaml": b"learning_rate: 0.001\n"}
    for name, content in markers.items():
        (out / name).write_bytes(content)
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "model.safetensors").write_bytes(b"checkpoint")
    before = sorted(os.listdir(out))
    failing = [
        ["sft", *_base(tmp_path), "--lerning_rate", "1"],
        ["dpo", *_base(tmp_path)],  # wrong columns: fails after the model is loaded
        ["sft", *_base(tmp_path), "--max_length", "2"],  # every example too long
        ["grpo", *_base(tmp_path, "posttrain/arith-prompts"), "--num_generations", "2", "--max_completion_length",
         "4", "--reward_funcs", _reward_file(tmp_path) + ":boom"],  # fails inside train(), at the first step
    ]
    for argv in failing:
        assert main(argv) == 2, capsys.readouterr().err
    capsys.readouterr()
    assert sorted(os.listdir(out)) == before
    for name, content in markers.items():
        assert (out / name).read_bytes() == content
    assert (out / "checkpoint-5" / "model.safetensors").read_bytes() == b"checkpoint"
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"learning_rate": 0.001}


@pytest.mark.parametrize("argv,needle", [
    (["sft", "--lerning_rate", "1"], "posttrain sft: error: unknown flag '--lerning_rate'; did you mean"),
    (["dpo", "--model_name_or_path", MODEL, "--dataset_name", "posttrain/arith-sft", "--dataset_train_split",
      "train[:4]", "--report_to", "none"], "posttrain dpo: error: DPOTrainer expects a dataset with columns"),
], ids=["unknown-flag", "wrong-columns"])
def test_no_traceback_reaches_the_terminal(tmp_path, argv, needle):
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "posttrain", *argv, "--output_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].startswith(needle)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """checkpoint-1 of a one-step SFT run on posttrain/tiny."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = SFTConfig(output_dir=str(out), report_to="none", max_steps=1, per_device_train_batch_size=2,
                     save_strategy="steps", save_steps=1)
    SFTTrainer(MODEL, args=args, train_dataset=_data("arith-sft")).train()
    return out / "checkpoint-1"


def _resume(tmp_path, checkpoint, model=MODEL):
    args = SFTConfig(**{**_kw(tmp_path), "max_steps": 2})
    return SFTTrainer(model, args=args, train_dataset=_data("arith-sft")).train(resume_from_checkpoint=checkpoint)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, saved_checkpoint, name):
    import shutil

    from posttrain.errors import UserError

    checkpoint = tmp_path / "copy" / "checkpoint-1"
    shutil.copytree(saved_checkpoint, checkpoint)
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])  # a copy cut short, a disk that filled up
    with pytest.raises(UserError, match=rf"checkpoint-1/{re.escape(name)} is .*the checkpoint is damaged") as info:
        _resume(tmp_path, str(checkpoint))
    assert "\n" not in str(info.value)


def test_resume_with_a_model_of_another_shape(tmp_path, saved_checkpoint):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match=r"was saved from a model of another shape than this run's"):
        _resume(tmp_path, str(saved_checkpoint), model="posttrain/tiny-4m")


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path, saved_checkpoint):
    import shutil

    from posttrain.errors import UserError

    out = tmp_path / "out"
    shutil.copytree(saved_checkpoint, out / "checkpoint-1")

    def fresh(**kw):
        args = SFTConfig(**{**_kw(tmp_path), "max_steps": 2, "save_strategy": "steps", "save_steps": 2, **kw})
        return SFTTrainer(MODEL, args=args, train_dataset=_data("arith-sft"))

    with pytest.raises(UserError, match=r"already holds checkpoints of an earlier run \(checkpoint-1\); continue it "
                                        r"with --resume_from_checkpoint latest.*--overwrite_output_dir True"):
        fresh().train()
    assert (out / "checkpoint-1").is_dir()  # refused before anything was touched
    fresh(overwrite_output_dir=True).train()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


def test_a_model_id_the_hub_cannot_serve_fails_at_once(monkeypatch):
    """Not a local path, not cached, and the Hub unreachable (or without it): one line after one short probe, not
    a minute of retries inside from_pretrained."""
    import huggingface_hub

    from posttrain.errors import UserError
    from posttrain.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(name, timeout=None):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    loading._hub_problem.cache_clear()
    with pytest.raises(UserError, match=r"'someone/some-model' is not a local path .* the Hub cannot be reached"):
        loading.resolve_model_path("someone/some-model")
    loading._hub_problem.cache_clear()
