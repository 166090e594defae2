"""Run reports: metrics.jsonl, plots chosen by logged metrics, report.html, the model card, the concise progress bar."""

import html.parser
import json
import logging
import os
import re

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from posttrain import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from posttrain.data.arith import load_builtin_dataset
from posttrain.reporting import html as report_html
from posttrain.reporting import metrics_log, plots, summary
from posttrain.reporting.progress import ConciseProgress, key_metrics_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sft(tmp_path, **kw):
    args = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, report_to="none", save_strategy="no", max_length=64, seed=0, eval_strategy="steps",
                eval_steps=2, per_device_eval_batch_size=8)
    args.update(kw)
    return SFTTrainer(model="posttrain/tiny", args=SFTConfig(**args),
                      train_dataset=load_builtin_dataset("posttrain/arith-sft", split="train[:32]"),
                      eval_dataset=load_builtin_dataset("posttrain/arith-sft", split="test[:8]"))


class _Checker(html.parser.HTMLParser):
    """Tags balanced (void elements aside) and images collected."""
    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check_html(path):
    checker = _Checker()
    with open(path) as f:
        checker.feed(f.read())
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    return checker


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-report")
    trainer = _sft(tmp)
    trainer.run_config_extra = {"model_name_or_path": "posttrain/tiny", "dataset_name": "posttrain/arith-sft"}
    trainer.train()
    trainer.save_model()
    return trainer, tmp / "out"


def test_metrics_jsonl_has_every_log_event(sft_run):
    trainer, out = sft_run
    rows = metrics_log.read(str(out))
    assert len(rows) == len(trainer.state.log_history)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert all("epoch" in r and "learning_rate" in r and "mean_token_accuracy" in r for r in train)
    assert "eval_mean_token_accuracy" in evals[0] and "train_runtime" in rows[-1]


def test_plots_and_report(sft_run):
    _, out = sft_run
    if plots.matplotlib_available():
        names = sorted(os.listdir(out / "plots"))
        assert names == ["accuracy.png", "entropy.png", "learning_rate.png", "loss.png"]
        for name in names:
            assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    page = _check_html(out / "report.html")
    text = " ".join(page.text)
    assert "posttrain SFT run" in text and "posttrain/arith-sft" in text and "posttrain/tiny" in text
    assert "mean_token_accuracy" in text and "eval_loss" in text  # summary table
    assert "per_device_train_batch_size" in text  # resolved config
    if plots.matplotlib_available():
        assert len(page.images) == 4 and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    assert not any(n.endswith(".tmp") or ".tmp" in n for n in os.listdir(out))


def test_model_card(sft_run):
    trainer, out = sft_run
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: posttrain/tiny" in card and "- posttrain/arith-sft" in card
    assert "supervised fine-tuning (SFT)" in card and "## Final metrics" in card
    last_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    assert f"| loss | {summary.fmt(last_loss)} |" in card and "| eval_mean_token_accuracy |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_without_matplotlib_tables_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    monkeypatch.setattr(plots, "_warned", False)
    trainer = _sft(tmp_path, max_steps=2, eval_strategy="no")
    with caplog.at_level(logging.INFO, logger="posttrain.reporting.plots"):
        trainer.train()
    out = tmp_path / "out"
    assert not (out / "plots").exists()
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 1
    page = _check_html(out / "report.html")
    assert page.images == [] and "matplotlib is not installed" in " ".join(page.text)


def test_failed_run_leaves_earlier_metrics(tmp_path):
    trainer = _sft(tmp_path, max_steps=2, eval_strategy="no")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    trainer.compute_loss = broken
    with pytest.raises(RuntimeError):
        trainer.train()
    assert (out / "metrics.jsonl").read_text() == '{"step": 7, "loss": 1.0}\n'


def test_online_run_plots_rl_curves_and_completions(tmp_path):
    def short(completions, **kwargs):
        return [-len(c) / 10 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, learning_rate=1e-3, logging_steps=1,
                      report_to="none", save_strategy="no", seed=0, log_completions=True)
    trainer = GRPOTrainer(model="posttrain/tiny", reward_funcs=short, args=args,
                          train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    trainer.train()
    out = tmp_path / "out"
    if plots.matplotlib_available():
        names = set(os.listdir(out / "plots"))
        assert {"reward.png", "completion_length.png", "entropy.png", "loss.png"} <= names
    page = _check_html(out / "report.html")
    text = " ".join(page.text)
    assert "completions" in text and "advantage" in text and "Question:" in text


def test_choose_panels_by_metric_keys():
    def stems(keys):
        return [stem for stem, _, _ in plots.choose_panels(keys)]

    assert stems(["loss", "eval_loss", "learning_rate", "mean_token_accuracy"]) == ["loss", "accuracy",
                                                                                     "learning_rate"]
    dpo = stems(["loss", "rewards/margins", "rewards/accuracies", "eval_rewards/accuracies", "rewards/chosen",
                 "rewards/rejected", "learning_rate"])
    assert dpo == ["loss", "rewards_accuracies", "rewards_margins", "rewards_chosen_rejected", "learning_rate"]
    grpo = plots.choose_panels(["reward", "rewards/accuracy_reward/mean", "kl", "completions/mean_length",
                                "entropy"])
    assert [s for s, _, _ in grpo] == ["reward", "kl", "completion_length", "entropy"]
    assert grpo[0][2] == ["reward", "rewards/accuracy_reward/mean"]


def test_summary_first_last_best():
    rows = [{"step": 1, "loss": 2.0, "mean_token_accuracy": 0.1, "learning_rate": 1e-3},
            {"step": 2, "eval_loss": 1.5, "eval_runtime": 0.3},
            {"step": 3, "loss": 0.5, "mean_token_accuracy": 0.4, "learning_rate": 5e-4, "grad_norm": float("nan")},
            {"step": 4, "loss": 0.7, "mean_token_accuracy": 0.3}]
    table = {r["metric"]: r for r in summary.summarise(rows)}
    assert set(table) == {"loss", "mean_token_accuracy", "learning_rate", "eval_loss"}
    assert (table["loss"]["first"], table["loss"]["last"], table["loss"]["best"]) == (2.0, 0.7, 0.5)
    assert table["mean_token_accuracy"]["best"] == 0.4 and table["learning_rate"]["best"] is None
    assert [r["metric"] for r in summary.summarise(rows)][-1] == "eval_loss"  # eval rows last
    assert summary.fmt(2e-3) == "2e-3" and summary.fmt(0.4123) == "0.412" and summary.fmt(None) == "—"


def test_metrics_log_resume_rewrites_from_history(tmp_path):
    metrics_log.append(str(tmp_path), {"step": 9, "loss": 3.0})  # rows of a longer, abandoned run
    metrics_log.rewrite(str(tmp_path), [{"step": 1, "epoch": 0.1, "loss": 1.0}, {"step": 2, "loss": float("nan")}])
    metrics_log.append(str(tmp_path), metrics_log.record({"loss": 0.5}, 3, 0.3, 1.25))
    rows = metrics_log.read(str(tmp_path / "metrics.jsonl"))
    assert rows == [{"step": 1, "epoch": 0.1, "loss": 1.0}, {"step": 2, "epoch": None, "loss": None},
                    {"step": 3, "epoch": 0.3, "time": 1.25, "loss": 0.5}]


def test_html_escapes_and_embeds(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(PNG_MAGIC + b"data")
    page = report_html.run_page("t <1>", {"a": "<b>"}, [], [str(png)], {"k": [1, 2]},
                                [{"prompt": "<p>", "completion": "c", "reward": 0.5}])
    (tmp_path / "r.html").write_text(page)
    checker = _check_html(tmp_path / "r.html")
    assert "&lt;b&gt;" in page and checker.images[0]["src"].startswith("data:image/png;base64,")


def test_progress_line_and_callbacks(tmp_path):
    assert key_metrics_line({"loss": 0.413, "mean_token_accuracy": 0.93, "learning_rate": 2e-3, "epoch": 1.0}) \
        == "loss 0.413 · acc 0.93 · lr 2e-3"
    assert key_metrics_line({"eval_loss": 0.5, "eval_rewards/accuracies": 0.75, "eval_mean_token_accuracy": 0.1},
                            "eval_") == "loss 0.5 · acc 0.75"
    kinds = [type(c) for c in _sft(tmp_path, eval_strategy="no").callback_handler.callbacks]
    assert ConciseProgress in kinds and ProgressCallback not in kinds
    kinds = [type(c) for c in _sft(tmp_path, eval_strategy="no", disable_tqdm=True).callback_handler.callbacks]
    assert PrinterCallback in kinds and ConciseProgress not in kinds


def test_progress_prints_concise_lines(tmp_path, capsys):
    trainer = _sft(tmp_path, max_steps=2, eval_steps=2)
    trainer.train()
    captured = capsys.readouterr()
    out = captured.out  # the lines go to stdout (like transformers' dict lines), the bar to stderr
    assert "step 2/2: loss " in out and " · acc " in out and "eval @ 2: loss " in out
    assert "{'loss'" not in out + captured.err  # no full dicts
    # the postfix on the bar, after tqdm's rate ("3.2step/s" when fast, "1.5s/step" when slow)
    assert re.search(r"(step/s|s/step), loss ", captured.err)
    json.dumps(trainer.state.log_history)  # sanity: history stays serialisable
