"""`posttrain pipeline`: the YAML format and references, stage chaining, per-stage figures, summary files, --from."""

import json
import os

import pytest

from posttrain import cli
from posttrain.pipeline import spec
from posttrain.pipeline.spec import PipelineError
from posttrain.reporting import plots

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "arith-pipeline.yaml")


def _write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_example_resolves_to_the_documented_chain():
    pipeline = spec.load(EXAMPLE, output_dir="OUT")
    assert [(s.name, s.command) for s in pipeline.stages] == [("sft", "sft"), ("reward", "reward"), ("dpo", "dpo"),
                                                                ("grpo", "grpo")]
    models = [s.options["model_name_or_path"] for s in pipeline.stages]
    assert models == ["posttrain/tiny-4m", os.path.join("OUT", "sft"), os.path.join("OUT", "sft"),
                      os.path.join("OUT", "dpo")]
    assert [s.output_dir for s in pipeline.stages] == [os.path.join("OUT", n) for n in ("sft", "reward", "dpo", "grpo")]
    assert [s.evaluate for s in pipeline.stages] == [True, False, True, True]
    reward = pipeline.stages[1].options
    assert reward["max_steps"] == 150 and reward["dataset_name"] == "posttrain/arith-pref-implicit"  # yaml < stage
    assert pipeline.evaluation["num_prompts"] == 1000 and pipeline.evaluation["split"] == "test"



def test_example_stage_configs_are_valid(tmp_path):
    from posttrain.pipeline.run import check_stages

    pipeline = spec.load(EXAMPLE, output_dir=str(tmp_path))
    check_stages(pipeline.stages, pipeline)  # each resolved config parses with its command's options
    assert sorted(os.listdir(tmp_path / "stage-configs")) == ["dpo.yaml", "grpo.yaml", "reward.yaml", "sft.yaml"]


def test_references_anywhere_and_defaults(tmp_path):
    path = _write(tmp_path, """
output_dir: run
defaults: {max_steps: 5, report_to: none}
stages:
  - {name: sft, model_name_or_path: posttrain/tiny, max_steps: 7}
  - {name: rm, command: reward, model_name_or_path: "{prev}"}
  - {name: grpo, model_name_or_path: "{stages.sft}", reward_funcs: ["{stages.rm}", accuracy_reward],
     logging_dir: "{output_dir}/tb"}
""")
    stages = spec.load(path).stages
    assert stages[0].options["max_steps"] == 7 and stages[1].options["max_steps"] == 5
    assert stages[1].options["model_name_or_path"] == os.path.join("run", "sft")
    assert stages[2].options["reward_funcs"] == [os.path.join("run", "rm"), "accuracy_reward"]
    assert stages[2].options["logging_dir"] == "run/tb"


@pytest.mark.parametrize("text,message", [
    ("stage: []", "unknown key 'stage'"),
    ("stages: []", "needs 'stages'"),
    ("stages: [{name: sft, model_name_or_path: '{prev}'}]", "is the first stage"),
    ("stages: [{name: sft, model_name_or_path: x}, {name: dpo, model_name_or_path: '{stages.sfft}'}]",
     "did you mean 'stages.sft'"),
    ("stages: [{name: sft, model_name_or_path: x}, {name: dpo, model_name_or_path: '{stages.dpo}'}]",
     "unknown reference"),
    ("stages: [{name: sft, model_name_or_path: x}, {name: rm, command: reward, model_name_or_path: '{prev}'},"
     " {name: dpo, model_name_or_path: '{prev}'}]", "a reward model"),
    ("stages: [{name: fst, model_name_or_path: x}]", "unknown command 'fst'; did you mean 'sft'?"),
    ("stages: [{name: sft, model_name_or_path: x}, {name: sft, model_name_or_path: x}]", "appears twice"),
    ("stages: [{name: sft, config: nope.yaml}]", "config file 'nope.yaml' not found"),
    ("stages: [{name: sft}]", "has no model_name_or_path"),
    ("evaluation: {num_prompt: 3}\nstages: [{name: sft, model_name_or_path: x}]", "did you mean 'num_prompts'"),
    ("evaluation: {dtype: float16}\nstages: [{name: sft, model_name_or_path: x}]", "use float32, bfloat16 or auto"),
    ("evaluation: {sampled_prompts: 0}\nstages: [{name: sft, model_name_or_path: x}]", "sampled_prompts 0"),
    ("evaluation: {sampled_prompts: half}\nstages: [{name: sft, model_name_or_path: x}]", "number of questions >= 1"),
])
def test_spec_errors(tmp_path, text, message):
    with pytest.raises(PipelineError, match=None) as info:
        spec.load(_write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sampled_answers_on_a_subset_of_the_questions():
    """sampled_prompts: N: every question answered greedily, the first N also by sampling; the record, the
    summary line and the paired comparison say so."""
    from datasets import Dataset

    from posttrain.models import loading
    from posttrain.pipeline import run, summary

    model, tokenizer = loading.load_pretrained_model("posttrain/tiny"), loading.load_tokenizer("posttrain/tiny")
    loading.prepare_tokenizer(tokenizer)
    prompts = Dataset.from_list([{"prompt": f"{a} + {a} =", "answer": str(2 * a)} for a in range(5)])
    evaluation = {**spec.EVALUATION_DEFAULTS, "max_new_tokens": 3, "batch_size": 4, "samples_per_prompt": 2,
                  "sampled_prompts": 3}
    record = run.answer_accuracy(model, tokenizer, prompts, evaluation)
    assert record["num_prompts"] == 5 and len(record["answer_correct"]) == 5
    assert record["sampled_prompts"] == 3 and len(record["sampled_scores"]) == 3
    assert "(T=1, 2 per prompt, first 3 prompts)" in summary.describe(record)
    start = {**record, "name": "base", "output_dir": None, "model_from": "m"}
    stage = {**record, "name": "sft", "model_from": "m"}
    run.compare_with_start(stage, [start])
    assert stage["versus_sampled"]["fixed"] == stage["versus_sampled"]["broken"] == 0  # the same scores
    whole = run.answer_accuracy(model, tokenizer, prompts, {**evaluation, "sampled_prompts": 10})  # more than there are
    assert whole["sampled_prompts"] == 5 and "first" not in summary.describe(whole)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["pipeline", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"posttrain pipeline: error: pipeline file {str(tmp_path / 'missing.yaml')!r} not found"
    bad_option = _write(tmp_path, "stages: [{name: sft, model_name_or_path: posttrain/tiny, dataset_name: x,"
                                  " learning_rte: 1}]")
    assert cli.main(["pipeline", bad_option, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage 'sft': unknown key 'learning_rte'" in err
    assert "did you mean 'learning_rate'" in err and not (tmp_path / "o" / "sft").exists()  # checked before training


TINY = """
output_dir: {out}
evaluation: {{num_prompts: 4, max_new_tokens: 4, batch_size: 4, samples_per_prompt: 2,
             drift_dataset: posttrain/chat-prompts, drift_prompts: 6, drift_max_new_tokens: 5}}
defaults: {{report_to: none, save_strategy: "no", logging_steps: 1, per_device_train_batch_size: 4}}
stages:
  - name: sft
    model_name_or_path: posttrain/tiny
    dataset_name: posttrain/arith-sft
    max_steps: 2
    max_length: 64
{more}
  - name: dpo
    model_name_or_path: "{{stages.sft}}"
    dataset_name: posttrain/arith-pref
    max_steps: 1
    max_length: 64
"""


def _check_outputs(out, names, capsys_out):
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base"] + names
    by_name = {s["name"]: s for s in summary["stages"]}
    for name in names:
        assert (out / name / "config.json").is_file() and (out / "stage-configs" / f"{name}.yaml").is_file()
        assert by_name[name]["seconds"] > 0 and by_name[name]["key_metric"]["label"]
    assert by_name["dpo"]["model_from"] == str(out / "sft")
    for name in ("base", "sft", "dpo"):
        assert 0.0 <= by_name[name]["answer_accuracy"] <= 1.0 and by_name[name]["num_prompts"] == 4
        assert 0.0 <= by_name[name]["sampled_accuracy"] <= 1.0 and by_name[name]["samples_per_prompt"] == 2
    versus = by_name["dpo"]["versus"]  # question by question against the model the stage started from
    assert versus["stage"] == "sft" and len(by_name["dpo"]["answer_correct"]) == 4
    assert versus["fixed"] + versus["broken"] <= 4 and 0.0 < versus["p_value"] <= 1.0
    assert by_name["sft"]["versus"]["stage"] == "base"
    sampled = by_name["dpo"]["versus_sampled"]  # each question's mean over its 2 samples, sign test against sft
    assert sampled["stage"] == "sft" and sampled["fixed"] + sampled["broken"] <= 4 and 0.0 < sampled["p_value"] <= 1.0
    assert len(by_name["dpo"]["sampled_scores"]) == 4 and set(by_name["dpo"]["sampled_scores"]) <= {0.0, 0.5, 1.0}
    assert (by_name["dpo"]["sampled_accuracy"]
            == pytest.approx(sum(by_name["dpo"]["sampled_scores"]) / 4))  # accuracy_reward scores every answer
    assert by_name["base"]["drift_kl"] == 0.0 and by_name["dpo"]["drift_prompts"] == 6  # KL from the start model
    sft_drift, stderr = by_name["sft"]["drift_kl"], by_name["sft"]["drift_kl_stderr"]  # 2 steps: a small KL whose
    assert stderr > 0 and abs(sft_drift) < 5 * stderr + 0.05  # Monte-Carlo estimate may land just below 0
    assert len(by_name["dpo"]["chat_examples"]) == 3 and (out / "drift-reference.json").is_file()
    card = (out / "dpo" / "README.md").read_text()
    assert "held-out answer accuracy (4 prompts, greedy)" in card
    assert "held-out answer accuracy (sampled, T=1, 2 per prompt)" in card
    held_out = card.split("## Held-out evaluation", 1)[1].split("## Use", 1)[0]  # task, figures, command
    assert "4 held-out prompts of `posttrain/arith-prompts`" in held_out and "scored by `accuracy_reward`" in held_out
    assert (f"against its start model (stage `sft`), question by question: {versus['fixed']} fixed, "
            f"{versus['broken']} broken") in held_out and "6 prompts of `posttrain/chat-prompts`" in held_out
    assert (f"sampled (T = 1, 2 per question): accuracy {by_name['dpo']['sampled_accuracy']:.3f}; against its start "
            f"model, questions scored higher {sampled['fixed']}, lower {sampled['broken']}, sign test") in held_out
    assert "posttrain pipeline " in held_out and "--from dpo" in held_out
    page = (out / "report.html").read_text()
    assert all(f'href="{name}/report.html"' in page for name in names)
    assert "Other chat prompts, answered after each stage" in page and "Held-out questions, answered" in page
    if plots.matplotlib_available():
        assert (out / "answer_accuracy.png").read_bytes()[:4] == b"\x89PNG" and "data:image/png;base64," in page
        assert (out / "sampled_accuracy.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "drift_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "pipeline [1/" in capsys_out and "held-out answer accuracy" in capsys_out
    assert "stage" in capsys_out and "answer acc" in capsys_out and "key metric" in capsys_out  # closing table
    assert "sampled acc" in capsys_out and "sampled (T=1, 2 per prompt)" in capsys_out
    assert "vs sft: +" in capsys_out and "McNemar p" in capsys_out and "KL from start" in capsys_out
    assert "sampled vs sft: +" in capsys_out and " higher / −" in capsys_out and "sign test p" in capsys_out
    return by_name


def test_two_stage_pipeline_and_rerun_from(tmp_path, capsys):
    path = _write(tmp_path, TINY.format(out=tmp_path / "out", more=""))
    assert cli.main(["pipeline", path]) == 0
    out = tmp_path / "out"
    _check_outputs(out, ["sft", "dpo"], capsys.readouterr().out)
    sft_weights = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["pipeline", path, "--from", "dpo"]) == 0
    printed = capsys.readouterr().out
    assert "pipeline [1/2] sft" not in printed and "pipeline [2/2] dpo done" in printed
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["stages"][1]["reused"] is True and summary["stages"][1]["answer_accuracy"] is not None
    assert cli.main(["pipeline", path, "--from", "ppo"]) == 2


@pytest.mark.slow
def test_four_stage_pipeline(tmp_path, capsys):
    more = """  - name: reward
    model_name_or_path: "{stages.sft}"
    dataset_name: posttrain/arith-pref
    max_steps: 2
    max_length: 64"""
    grpo = """
  - name: grpo
    model_name_or_path: "{prev}"
    dataset_name: posttrain/arith-prompts
    reward_funcs: [accuracy_reward]
    num_generations: 2
    max_completion_length: 6
    max_steps: 2
"""
    path = _write(tmp_path, TINY.format(out=tmp_path / "out", more=more) + grpo)
    assert cli.main(["pipeline", path]) == 0
    by_name = _check_outputs(tmp_path / "out", ["sft", "reward", "dpo", "grpo"], capsys.readouterr().out)
    assert by_name["reward"].get("answer_accuracy") is None and by_name["reward"]["key_metric"]["metric"] == "accuracy"
    assert by_name["grpo"]["key_metric"]["metric"] == "reward"
    assert by_name["grpo"]["model_from"] == str(tmp_path / "out" / "dpo")
