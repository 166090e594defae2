"""Pipelines: several training stages run in order from one YAML file, each stage's model feeding the next.

- `spec.py`    the YAML format, references between stages (`{prev}`, `{stages.NAME}`, `{output_dir}`), checks
- `run.py`     `posttrain pipeline FILE.yaml`: runs the stages, evaluates after each, writes the summary
- `summary.py` the per-stage figures: printed table, pipeline_summary.json, the top-level report.html

Not here: the training commands themselves (`cli.py`), held-out scoring (`evaluation.py`).
"""
