"""posttrain pairs: on-policy preference pairs (best vs worst of a model's own sampled answers) and the pipeline
stage that builds them for a DPO stage."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import cli
from posttrain.data.loading import load_any_dataset
from posttrain.models.builtin import builtin_model_path
from posttrain.pairs import PairsError, resolve_options, sample_pairs
from posttrain.pipeline import spec
from posttrain.rewards.runner import RewardRunner


def _tiny():
    path = builtin_model_path("posttrain/tiny")
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path), tok


def test_best_and_worst_answer_of_each_prompt_make_the_pair():
    model, tok = _tiny()
    rows = [{"prompt": f"Q: {a} + {b}?", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
    seen = []

    def digits(completions, answer, **kwargs):  # a score that differs between samples; prompt 1 scores all 0
        seen.extend(answer)
        return [0.0 if a == "7" else float(sum(ch.isdigit() for ch in c)) + len(c) / 1000
                for c, a in zip(completions, answer)]

    pairs, counts = sample_pairs(model, tok, rows, RewardRunner([digits]), num_generations=4, max_new_tokens=8,
                                 batch_size=8)
    assert seen == [r["answer"] for r in rows for _ in range(4)]  # other columns reach the reward, per answer
    assert counts == {"prompts": 3, "pairs": 2, "all_same": 1}
    assert [p["answer"] for p in pairs] == ["3", "11"]
    for p in pairs:
        assert p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"]
        assert p["score_chosen"] == pytest.approx(sum(ch.isdigit() for ch in p["chosen"]) + len(p["chosen"]) / 1000)


def test_cli_writes_a_preference_data_set_dpo_reads(tmp_path, capsys):
    out = tmp_path / "pairs"
    (tmp_path / "score.py").write_text("def distinct(completions, **kwargs):\n"
                                       "    return [float(len(set(c))) for c in completions]\n")
    argv = ["pairs", "--model_name_or_path", "posttrain/tiny", "--dataset_name", "posttrain/arith-prompts",
            "--num_prompts", "4", "--reward_funcs", f"{tmp_path / 'score.py'}:distinct", "--num_generations", "3",
            "--max_new_tokens", "6", "--output_dir", str(out), "--dtype", "auto"]
    assert cli.main(argv) == 0
    assert "pairs from 4 prompts" in capsys.readouterr().out
    counts = json.loads((out / "pairs.json").read_text())
    from posttrain import hardware  # auto: a bf16 copy decodes where bf16 is native, float32 elsewhere

    assert counts["dtype"] == ("float32" if hardware.bf16_is_slow_here(use_cpu=not hardware.has_cuda()) else "bfloat16")
    data = load_any_dataset(str(out), None, "train")
    assert len(data) == counts["pairs"] > 0 and {"prompt", "chosen", "rejected", "answer"} <= set(data.column_names)
    assert cli.main(["dpo", "--model_name_or_path", "posttrain/tiny", "--dataset_name", str(out), "--max_steps", "1",
                     "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                     "--output_dir", str(tmp_path / "dpo")]) == 0


@pytest.mark.parametrize("options, message", [
    ({"num_generations": 1}, "--num_generations must be at least 2"),
    ({"temperature": 0.0}, "--temperature must be > 0"),
    ({"num_generation": 4}, "did you mean 'num_generations'"),
    ({"dataset_name": None}, "pairs needs dataset_name"),
    ({"dtype": "float16"}, "--dtype must be float32, bfloat16 or auto"),
])
def test_bad_options_are_one_line(options, message):
    base = {"model_name_or_path": "posttrain/tiny", "dataset_name": "posttrain/arith-prompts", "output_dir": "x"}
    with pytest.raises(PairsError, match=message.replace("(", r"\(")):
        resolve_options({**base, **options})


def test_no_pairs_is_an_error_that_says_what_to_change(tmp_path):
    with pytest.raises(PairsError, match="no pairs: every prompt's 2 answers scored the same"):
        cli.main(["pairs", "--model_name_or_path", "posttrain/tiny", "--dataset_name", "posttrain/arith-prompts",
                  "--num_prompts", "2", "--num_generations", "2", "--max_new_tokens", "3", "--output_dir",
                  str(tmp_path / "p"), "--debug"])
    assert not (tmp_path / "p" / "train.jsonl").exists()


def test_pipeline_stage_chain(tmp_path):
    text = f"""
output_dir: {tmp_path / 'out'}
evaluation: {{num_prompts: 2, max_new_tokens: 2, base: false}}
defaults: {{report_to: none, seed: 3, logging_steps: 1}}
stages:
  - {{name: sft, model_name_or_path: posttrain/tiny, dataset_name: posttrain/arith-sft, max_steps: 1}}
  - {{name: pairs, command: pairs, model_name_or_path: "{{stages.sft}}", dataset_name: posttrain/arith-prompts,
     reward_funcs: [length_reward], num_generations: 3, num_prompts: 4, max_new_tokens: 4}}
  - {{name: dpo, model_name_or_path: "{{stages.sft}}", dataset_name: "{{stages.pairs}}", max_steps: 1}}
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    pipeline = spec.load(str(path))
    pairs = pipeline.stages[1]
    assert pairs.options["max_new_tokens"] == 4
    assert pairs.evaluate is False and pairs.is_policy is False
    assert pairs.options["seed"] == 3 and "report_to" not in pairs.options  # defaults a pairs stage has
    assert pipeline.stages[2].options["dataset_name"] == str(tmp_path / "out" / "pairs")
    bad = text.replace('dataset_name: "{stages.pairs}", max_steps: 1', 'dataset_name: x, max_steps: 1').replace(
        'name: dpo, model_name_or_path: "{stages.sft}"', 'name: dpo, model_name_or_path: "{stages.pairs}"')
    path.write_text(bad)
    with pytest.raises(spec.PipelineError, match="a data set of pairs, not a model"):
        spec.load(str(path))
    path.write_text(text.replace("max_new_tokens: 4}", "max_new_tokens: 4, evaluate: true}"))
    with pytest.raises(spec.PipelineError, match="writes a data set, not a model"):
        spec.load(str(path))
    (tmp_path / "score.py").write_text("def distinct(completions, **kwargs):\n"
                                       "    return [float(len(set(c))) for c in completions]\n")
    path.write_text(text.replace("[length_reward]", f"['{tmp_path / 'score.py'}:distinct']"))
    assert cli.main(["pipeline", str(path)]) == 0
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "pipeline_summary.json").read_text())["stages"]}
    assert stages["pairs"]["pairs"] > 0 and stages["pairs"]["pair_prompts"] == 4
    assert stages["dpo"]["answer_accuracy"] is not None and "answer_accuracy" not in stages["pairs"]
