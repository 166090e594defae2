"""`posttrain pipeline FILE.yaml [--output_dir DIR] [--from STAGE]`: run a pipeline's stages in order.

Each stage is an ordinary training command (`posttrain sft`, `dpo`, …) given its resolved config, written first
to OUTPUT_DIR/stage-configs/NAME.yaml (so a stage can be rerun alone with `posttrain CMD --config` that file).
After a policy stage the model's held-out answer accuracy is measured by greedy generation
(`evaluation.generation_accuracy`) and printed with the stage's key metric and, question by question, against the
model the stage started from (fixed / broken, McNemar p: is the change more than noise?); the accuracies go into the
stage's model card and report. At the end: a table, pipeline_summary.json and a report.html linking the stages'
reports.
`--from STAGE` reruns from that stage on, reusing the saved outputs of the stages before it.

Not here: the YAML format (`spec.py`), the figures' layout (`summary.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

import yaml

from posttrain.pairs import PAIRS_FILE
from posttrain.pipeline import spec, summary
from posttrain.pipeline.spec import PipelineError, Stage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain pipeline", allow_abbrev=False,
                                description="Run training stages in order from one YAML file.")
    p.add_argument("file", help="pipeline YAML, e.g. examples/arith-pipeline.yaml")
    p.add_argument("--output_dir", help="where the stages write (default: the file's output_dir)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage, reusing earlier outputs")

    def error(message: str) -> None:
        raise PipelineError(f"{message} (see posttrain pipeline --help)")

    p.error = error
    return p


def load_eval_prompts(evaluation: dict[str, Any]):
    from posttrain.data.loading import load_any_dataset

    dataset = load_any_dataset(evaluation["dataset_name"], evaluation.get("dataset_config"), evaluation["split"])
    if "prompt" not in dataset.column_names:
        raise PipelineError(f"evaluation data set {evaluation['dataset_name']!r} has no 'prompt' column "
                            f"(columns: {', '.join(dataset.column_names)})")
    return dataset.select(range(min(int(evaluation["num_prompts"]), len(dataset))))


def answer_accuracy(model, tokenizer, prompts, evaluation: dict[str, Any]) -> dict[str, Any]:
    from posttrain.evaluation import decoding_dtype, generation_accuracy, greedy_and_sampled_accuracy

    dtype = decoding_dtype(evaluation.get("dtype"))
    options = {"max_new_tokens": int(evaluation["max_new_tokens"]), "batch_size": int(evaluation["batch_size"]),
               "dtype": dtype}
    samples = int(evaluation.get("samples_per_prompt") or 0)
    if samples > 0:  # also what the policy does when it samples (what GRPO optimises), not only its argmax
        temperature = float(evaluation["sampling_temperature"])
        # the sampled answers on the first sampled_prompts questions (a fixed subset, the same every stage), from
        # the greedy answers' prefill
        result, sampled = greedy_and_sampled_accuracy(model, tokenizer, prompts, samples, temperature,
                                                      evaluation.get("sampled_prompts"), **options)
    else:
        result = generation_accuracy(model, tokenizer, prompts, **options)
    record = {"answer_accuracy": result["accuracy"], "answer_mean_length": result["mean_length"],
              "num_prompts": result["num_prompts"],
              # each question right (1) or not (0), greedy: what the next stage is compared with, question by question
              "answer_correct": "".join("1" if s else "0" for s in result["scores"]),
              "examples": [list(map(str, e)) for e in result["examples"]]}
    if samples > 0:
        # each question's mean score over its samples: the sampled side of the paired comparison
        per_question = [[x for x in sampled["scores"][i:i + samples] if x is not None]
                        for i in range(0, len(sampled["scores"]), samples)]
        record.update(sampled_accuracy=sampled["accuracy"], samples_per_prompt=samples,
                      sampled_prompts=sampled["num_prompts"], sampling_temperature=temperature,
                      sampled_scores=[round(sum(q) / len(q), 4) if q else 0.0 for q in per_question])
    return record


def evaluate_base(model_name: str, prompts, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The starting model's answer accuracy (the row before any stage)."""
    from posttrain.models import loading

    start = time.time()
    model = loading.load_pretrained_model(model_name)
    tokenizer = loading.load_tokenizer(model_name)
    loading.prepare_tokenizer(tokenizer)
    record = {"name": "base", "command": None, "model_from": model_name, "output_dir": None,
              **answer_accuracy(model, tokenizer, prompts, evaluation)}
    record["eval_seconds"] = round(time.time() - start, 1)
    return record


def drift_reference(pipeline: spec.Pipeline, model_name: str) -> dict[str, Any] | None:
    """The starting model's sampled answers to the drift prompts, with their log-probs: made once per pipeline and
    kept in OUTPUT_DIR/drift-reference.json (a `--from` rerun reuses it), so no stage needs the start model loaded."""
    evaluation = pipeline.evaluation
    if not evaluation.get("drift_dataset"):
        return None
    path = os.path.join(pipeline.output_dir, "drift-reference.json")
    if os.path.isfile(path):
        with open(path) as f:
            reference = json.load(f)
        if reference.get("model") == model_name and reference.get("dataset") == evaluation["drift_dataset"]:
            return reference
    from posttrain.data.loading import load_any_dataset
    from posttrain.evaluation import decoding_dtype, reference_samples
    from posttrain.models import loading
    from posttrain.reporting.atomic import write_text

    dataset = load_any_dataset(evaluation["drift_dataset"], None, evaluation["drift_split"])
    dataset = dataset.select(range(min(int(evaluation["drift_prompts"]), len(dataset))))
    model = loading.load_pretrained_model(model_name)
    tokenizer = loading.load_tokenizer(model_name)
    loading.prepare_tokenizer(tokenizer)
    reference = {"model": model_name, "dataset": evaluation["drift_dataset"],
                 "prompts": [row["prompt"] for row in dataset],
                 **reference_samples(model, tokenizer, dataset, int(evaluation["drift_max_new_tokens"]),
                                     dtype=decoding_dtype(evaluation.get("dtype")))}
    write_text(path, json.dumps(reference))
    del model
    gc.collect()
    return reference


def measure_drift(model, tokenizer, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's drift from the starting model on the drift prompts, and its answers to the first three."""
    if reference is None:
        return {}
    from posttrain.evaluation import chat_examples, drift_from_reference

    drift = drift_from_reference(model, tokenizer, reference)
    rows = [{"prompt": p} for p in reference["prompts"][:3]]
    return {"drift_kl": drift["kl"], "drift_kl_stderr": drift["kl_stderr"], "drift_kl_per_token": drift["kl_per_token"],
            "drift_prompts": drift["num_prompts"], "chat_examples": chat_examples(model, tokenizer, rows)}


def compare_with_start(record: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Add "versus": the stage's greedy results question by question against the model it started from (fixed,
    broken, McNemar p), when that model was evaluated on the same questions earlier in this pipeline; and
    "versus_sampled": the same for each question's mean score over its samples (the sign test), when both were
    sampled alike."""
    from posttrain.evaluation import paired_comparison

    start, after = record.get("model_from"), record.get("answer_correct")
    earlier = [r for r in records
               if r.get("output_dir") == start or (r["name"] == "base" and r.get("model_from") == start)]
    if not earlier:
        return  # the start model was not evaluated here
    origin = earlier[-1]  # the start model's record
    before = origin.get("answer_correct")
    if after and before and len(before) == len(after):  # else evaluated on other questions
        comparison = paired_comparison([c == "1" for c in before], [c == "1" for c in after])
        record["versus"] = {"stage": origin["name"], **comparison}
    before, after = origin.get("sampled_scores"), record.get("sampled_scores")
    alike = all(origin.get(k) == record.get(k) for k in ("samples_per_prompt", "sampling_temperature"))
    if after and before and len(before) == len(after) and alike:
        record["versus_sampled"] = {"stage": origin["name"], **paired_comparison(before, after)}


def card_evaluation(stage: Stage, pipeline: spec.Pipeline, record: dict[str, Any]) -> list[str]:
    """The model card's "held-out evaluation" lines: the task, the figures against the stage's start model, the
    drift check, and the commands that reproduce them."""
    evaluation = pipeline.evaluation
    task = f"`{evaluation['dataset_name']}` (split `{evaluation['split']}`)"  # spec.EVALUATION_DEFAULTS fill gaps
    lines = [f"- task: {record['num_prompts']} held-out prompts of {task}, answered greedily (at most "
             f"{evaluation['max_new_tokens']} new tokens) and scored by `accuracy_reward`",
             f"- held-out answer accuracy: {record['answer_accuracy']:.3f}"]
    comparison = record.get("versus")
    if comparison:
        lines.append(f"- against its start model (stage `{comparison['stage']}`), question by question: "
                     f"{comparison['fixed']} fixed, {comparison['broken']} broken, exact McNemar "
                     f"p = {comparison['p_value']:.2g}")
    comparison = record.get("versus_sampled")
    if comparison:
        lines.append(f"- sampled (T = {record['sampling_temperature']:g}, {record['samples_per_prompt']} per "
                     f"question{summary.on_subset(record)}): accuracy {record['sampled_accuracy']:.3f}; against "
                     f"its start model, questions "
                     f"scored higher {comparison['fixed']}, lower {comparison['broken']}, sign test "
                     f"p = {comparison['p_value']:.2g}")
    if record.get("drift_kl") is not None:
        lines.append(f"- outside the task: KL(starting model ‖ this model) = {record['drift_kl']:.2f} ± "
                     f"{record['drift_kl_stderr']:.2f} nats per answer on {record['drift_prompts']} prompts of "
                     f"`{evaluation['drift_dataset']}`")
    lines += ["", "Reproduce the whole pipeline, or this stage from the earlier stages' outputs:", "", "```bash",
              f"posttrain pipeline {pipeline.path}", f"posttrain pipeline {pipeline.path} --from {stage.name}",
              "```"]
    return lines


def write_stage_config(stage: Stage, pipeline: spec.Pipeline) -> str:
    """OUTPUT_DIR/stage-configs/NAME.yaml: the stage's resolved options, as its command's --config takes them."""
    from posttrain.reporting.atomic import write_text

    path = os.path.join(pipeline.output_dir, "stage-configs", f"{stage.name}.yaml")
    return write_text(path, yaml.safe_dump(stage.options, sort_keys=False))


def check_stages(stages: list[Stage], pipeline: spec.Pipeline) -> None:
    """Parse every stage's options with its command's parser before training anything: a typo in the last stage
    fails in seconds, not after the first stages have trained."""
    from posttrain import pairs
    from posttrain.cli import CLIError, parse_command_args

    for stage in stages:
        if stage.writes_data:
            pairs.resolve_options(stage.options)
            continue
        try:
            parse_command_args(stage.command, ["--config", write_stage_config(stage, pipeline)])
        except (CLIError, ValueError, TypeError) as e:
            raise PipelineError(f"stage '{stage.name}': {str(e).splitlines()[0] if str(e) else e}") from e


def run_stage(stage: Stage, pipeline: spec.Pipeline, prompts, reference=None,
              earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train one stage through its CLI command, then measure it (against its start model among the `earlier`
    records); returns the stage's record."""
    from posttrain import reporting
    from posttrain.cli import run_training

    start = time.time()
    config_path = write_stage_config(stage, pipeline)
    if stage.writes_data:  # a data set, not a model: nothing to evaluate
        from posttrain import pairs

        counts = pairs.run(stage.options)
        return {"name": stage.name, "command": stage.command, "model_from": stage.options.get("model_name_or_path"),
                "output_dir": stage.output_dir, "config": config_path, "seconds": round(time.time() - start, 1),
                "pairs": counts["pairs"], "pair_prompts": counts["prompts"]}
    try:
        trainer = run_training(stage.command, ["--config", config_path])
    except BaseException:
        print(f"pipeline: stage '{stage.name}' failed (its resolved config: {config_path})", file=sys.stderr,
              flush=True)
        raise
    record: dict[str, Any] = {"name": stage.name, "command": stage.command,
                              "model_from": stage.options.get("model_name_or_path"), "output_dir": stage.output_dir,
                              "config": config_path, "seconds": round(time.time() - start, 1),
                              "key_metric": summary.key_metric(stage.command, trainer.state.log_history)}
    if stage.evaluate and stage.is_policy and prompts is not None:
        eval_start = time.time()
        record.update(answer_accuracy(trainer.model, trainer.processing_class, prompts, pipeline.evaluation))
        record.update(measure_drift(trainer.model, trainer.processing_class, reference))
        record["eval_seconds"] = round(time.time() - eval_start, 1)
        compare_with_start(record, earlier or [])
        if trainer.is_world_process_zero():
            figures = {f"held-out answer accuracy ({record['num_prompts']} prompts, greedy)": record["answer_accuracy"]}
            if record.get("sampled_accuracy") is not None:
                figures[f"held-out answer accuracy (sampled, T={record['sampling_temperature']:g}, "
                        f"{record['samples_per_prompt']} per prompt{summary.on_subset(record)})"] = \
                    record["sampled_accuracy"]
            if record.get("drift_kl") is not None:
                figures[f"KL from the starting model on {record['drift_prompts']} other chat prompts (nats per "
                        "answer)"] = record["drift_kl"]
            reporting.write_model_card(trainer, stage.output_dir, extra=figures,
                                       evaluation=card_evaluation(stage, pipeline, record))
            reporting.write_report(trainer, extra={k: f"{v:.3f}" for k, v in figures.items()})
    del trainer
    gc.collect()
    return record


def _previous_records(output_dir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(output_dir, summary.SUMMARY_JSON)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {r["name"]: r for r in json.load(f).get("stages", [])}


def run(path: str, output_dir: str | None = None, start_at: str | None = None) -> list[dict[str, Any]]:
    """Run the pipeline in `path`; returns one record per stage (plus the starting model when evaluated)."""
    pipeline = spec.load(path, output_dir)
    names = [s.name for s in pipeline.stages]
    if start_at is not None and start_at not in names:
        raise PipelineError(f"--from {start_at!r} is not a stage of {path} (stages: {', '.join(names)})")
    begin = names.index(start_at) if start_at else 0
    for stage in pipeline.stages[:begin]:
        saved = PAIRS_FILE if stage.writes_data else "config.json"
        if not os.path.isfile(os.path.join(stage.output_dir, saved)):
            raise PipelineError(f"--from {start_at}: stage '{stage.name}' has no saved model in {stage.output_dir}; "
                                f"run the pipeline from '{stage.name}' or earlier")
    check_stages(pipeline.stages[begin:], pipeline)
    evaluation = pipeline.evaluation
    prompts = load_eval_prompts(evaluation) if any(s.evaluate for s in pipeline.stages) else None
    previous = _previous_records(pipeline.output_dir)
    records: list[dict[str, Any]] = []
    clock = time.time()
    first = pipeline.stages[0].options["model_name_or_path"]
    reference = drift_reference(pipeline, first) if prompts is not None else None
    if evaluation.get("base") and prompts is not None:
        records.append(previous["base"] if begin and "base" in previous else evaluate_base(first, prompts,
                                                                                            evaluation))
        if reference is not None:
            records[-1].update(drift_kl=0.0, drift_kl_stderr=0.0, drift_kl_per_token=0.0,
                               drift_prompts=len(reference["prompt_ids"]), chat_examples=reference["greedy_examples"])
        print(f"pipeline: starting model {first}: {summary.describe(records[-1])}", flush=True)
    for i, stage in enumerate(pipeline.stages):
        if i < begin:
            records.append({**previous.get(stage.name, {}), "name": stage.name, "command": stage.command,
                            "output_dir": stage.output_dir, "reused": True})
            continue
        print(f"pipeline [{i + 1}/{len(names)}] {stage.name}: posttrain {stage.command} from "
              f"{stage.options.get('model_name_or_path')} → {stage.output_dir}", flush=True)
        record = run_stage(stage, pipeline, prompts, reference, records)
        records.append(record)
        print(f"pipeline [{i + 1}/{len(names)}] {stage.name} done in {record['seconds']:.0f}s: "
              f"{summary.describe(record)}", flush=True)
        summary.write(pipeline.output_dir, path, records, time.time() - clock)  # partial results survive a crash
    paths = summary.write(pipeline.output_dir, path, records, time.time() - clock)
    print("\n" + summary.table(records))
    print(f"\npipeline: done in {time.time() - clock:.0f}s; summary {paths['json']}, report {paths['html']}")
    return records


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    run(args.file, args.output_dir, args.start)
