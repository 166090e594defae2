"""CLI: precedence default < YAML < flag, unknown keys/flags suggest, examples parse, env, one real run."""

import glob
import os
import subprocess
import sys

import datasets
import pytest
import yaml

from posttrain.cli import COMMANDS, CLIError, main, parse_command_args
from posttrain.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_precedence_default_yaml_flag(tmp_path):
    path = _yaml(tmp_path, {"learning_rate": 1e-4, "max_steps": 7, "model_name_or_path": "posttrain/tiny"})
    _, model_args, args = parse_command_args("sft", ["--config", path, "--max_steps", "9"])
    assert args.learning_rate == 1e-4  # YAML over default
    assert args.max_steps == 9  # flag over YAML
    assert args.per_device_train_batch_size == 8  # default
    assert model_args.model_name_or_path == "posttrain/tiny"


def test_guide_flags_parse():
    script, model, args = parse_command_args("sft", [
        "--model_name_or_path", "posttrain/tiny", "--dataset_name", "posttrain/arith-sft", "--output_dir",
        "./sft-output", "--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--learning_rate", "2e-5",
        "--max_seq_length", "2048", "--packing", "True"])
    assert (args.max_length, args.packing, args.num_train_epochs, args.learning_rate) == (2048, True, 3, 2e-5)
    assert script.dataset_name == "posttrain/arith-sft" and model.model_name_or_path == "posttrain/tiny"


def test_lora_and_model_flags_parse():
    _, model, _ = parse_command_args("sft", ["--use_peft", "True", "--lora_r", "8", "--lora_target_modules",
                                             "q_proj", "v_proj", "--dtype", "float32", "--attn_implementation", "sdpa"])
    peft_config = model.peft_config()
    assert peft_config.r == 8 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert model.init_kwargs()["attn_implementation"] == "sdpa"


@pytest.mark.parametrize("argv,needle", [
    (["sft", "--lerning_rate", "1"], "did you mean '--learning_rate'"),
    (["sft", "stray"], "unexpected argument"),
    (["sfx"], "did you mean 'sft'"),
])
def test_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_yaml_key_and_bad_yaml(tmp_path, capsys):
    assert main(["sft", "--config", _yaml(tmp_path, {"lerning_rate": 1})]) == 2
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    assert main(["sft", "--config", str(bad)]) == 2
    assert "not valid YAML (line" in capsys.readouterr().err


def test_help_and_env(capsys):
    assert main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "transformers:" in out and "cpu native bf16:" in out


def test_every_example_parses():
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
    assert files
    for path in files:
        command = os.path.basename(path).split(".")[0].split("-")[0]
        if command in COMMANDS:
            parse_command_args(command, ["--config", path])


def test_cli_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain", "sft", "--model_name_or_path", "posttrain/tiny", "--dataset_name",
           "posttrain/arith-sft", "--dataset_train_split", "train[:32]", "--output_dir", str(out), "--max_steps",
           "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--logging_steps", "1",
           "--learning_rate", "1e-3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "posttrain: done" in result.stdout and "token accuracy" in result.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model_name_or_path"] == "posttrain/tiny" and saved["max_steps"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_removed_training_arguments_are_translated(tmp_path):
    path = _yaml(tmp_path, {"evaluation_strategy": "steps", "eval_steps": 5})
    with pytest.warns(FutureWarning):
        _, _, args = parse_command_args("sft", ["--config", path, "--warmup_ratio", "0.1", "--overwrite_output_dir",
                                                "True", "--max_steps", "3"])
    assert args.warmup_steps == 0.1 and str(args.eval_strategy.value) == "steps" and args.max_steps == 3
    assert args.overwrite_output_dir  # an option again: it deletes an earlier run's checkpoints (test_resume)


def test_dataset_mixture_in_yaml(tmp_path):
    path = _yaml(tmp_path, {"datasets": [{"path": "posttrain/arith-sft", "split": "train[:3]"},
                                         {"path": "posttrain/arith-sft", "name": "conversational",
                                          "split": "train[:2]"}]})
    script, _, _ = parse_command_args("sft", ["--config", path])
    from posttrain.data.loading import load_train_eval

    with pytest.raises(UserError, match="cannot be combined"):  # standard beside conversational rows
        load_train_eval(script, want_eval=False)
    path = _yaml(tmp_path, {"datasets": [{"path": "posttrain/arith-sft", "split": "train[:3]"},
                                         {"path": "posttrain/arith-sft", "split": "test[:2]"}]}, "m.yaml")
    script, _, _ = parse_command_args("sft", ["--config", path])
    train, _ = load_train_eval(script, want_eval=False)
    assert len(train) == 5


def test_dataset_mixture_options_take_effect_or_are_refused(tmp_path):
    """TRL's mixture YAML: fractions, test_split_size (the evaluation split), streaming; the one-dataset options
    beside a mixture, a mixture option without a mixture and a mistyped entry key are one-line errors."""
    from posttrain.data.loading import load_train_eval

    entries = [{"path": "posttrain/arith-sft", "split": "train[:40]", "fraction": 3},
               {"path": "posttrain/arith-sft", "split": "test[:40]", "fraction": 1}]
    script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": entries, "test_split_size": 8})])
    assert script.datasets.test_split_size == 8 and script.datasets.datasets[0].fraction == 3
    train, evaluation = load_train_eval(script, want_eval=True)
    assert (len(train), len(evaluation)) == (45, 8)  # 40 + 13 rows (3 : 1, capped by the first), 8 held out
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    streamed = {"datasets": [{"path": str(rows)}, {"path": str(rows)}], "streaming": True}
    script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, streamed)])
    train, _ = load_train_eval(script, want_eval=False)
    assert isinstance(train, datasets.IterableDataset) and len(list(train)) == 4
    zero = [{**entries[0], "fraction": 0}, entries[1]]  # TRL's rule: a 0 share contributes no rows
    script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": zero})])
    assert len(load_train_eval(script, want_eval=False)[0]) == 40
    for first, second in ((-1, 1), (0, 0), (None, 1)):
        bad = [{**entries[0], "fraction": first}, {**entries[1], "fraction": second}]
        script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": bad})])
        with pytest.raises(UserError, match="Set a `fraction` >= 0 for every dataset"):
            load_train_eval(script, want_eval=False)
    for extra, match in (({"dataset_name": "posttrain/arith-sft"}, "Both a `datasets:` mixture and dataset_name"),
                         ({"dataset_config": "conversational"}, "Both a `datasets:` mixture and dataset_config")):
        script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": entries, **extra})])
        with pytest.raises(UserError, match=match):
            load_train_eval(script, want_eval=False)
    script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": entries}),
                                              "--dataset_test_split", "validation"])
    with pytest.raises(UserError, match="does not apply to a `datasets:` mixture"):
        load_train_eval(script, want_eval=True)
    script, _, _ = parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": entries})])
    with pytest.raises(UserError, match="no evaluation split; add test_split_size"):
        load_train_eval(script, want_eval=True)
    with pytest.raises(CLIError, match="applies to a `datasets:` mixture only"):
        parse_command_args("sft", ["--config", _yaml(tmp_path, {"dataset_name": "posttrain/arith-sft",
                                                                  "test_split_size": 0.1})])
    with pytest.raises(UserError, match="Unknown key 'fractoin'.*did you mean 'fraction'"):
        parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": [{"path": "a.jsonl", "fractoin": 1}]})])
    with pytest.raises(UserError, match="with a 'path'"):
        parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": [{"name": "x"}]})])
    with pytest.raises(UserError, match="must be a list"):
        parse_command_args("sft", ["--config", _yaml(tmp_path, {"datasets": {"path": "a.jsonl"}})])


def test_command_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--dataset_name", "--packing", "--assistant_only_loss", "--lora_r",
                 "--learning_rate", "--loss_type"):
        assert flag in out


def test_hyphenated_command_alias(capsys):
    """`posttrain online-dpo` is `posttrain online_dpo` (TRL spells its commands with hyphens)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["online-dpo", "--help"])
    assert exit_info.value.code == 0
    assert "--missing_eos_penalty" in capsys.readouterr().out


def test_eval_on_start_alone_loads_the_test_split(tmp_path):
    """eval_on_start with eval_strategy 'no' (a config's eval_on_start, the flag turning periodic evaluation off)
    evaluates once before training instead of stopping with transformers' 'evaluation requires an eval_dataset'."""
    from posttrain.cli import run_training

    trainer = run_training("sft", ["--model_name_or_path", "posttrain/tiny", "--dataset_name", "posttrain/arith-sft",
                                   "--dataset_train_split", "train[:8]", "--dataset_test_split", "test[:8]",
                                   "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                                   "--per_device_train_batch_size", "4", "--report_to", "none", "--eval_strategy",
                                   "no", "--eval_on_start", "true", "--save_strategy", "no"])
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
