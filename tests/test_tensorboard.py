"""report_to="tensorboard" goes through transformers' integration: event files land in output_dir/runs (or logging_dir)."""

import glob
import os

import pytest

pytest.importorskip("tensorboard")

from posttrain import SFTConfig, SFTTrainer  # noqa: E402
from posttrain.data.arith import load_builtin_dataset  # noqa: E402


def test_tensorboard_event_files(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     report_to=["tensorboard"], save_strategy="no", max_length=64)
    trainer = SFTTrainer(model="posttrain/tiny", args=args,
                         train_dataset=load_builtin_dataset("posttrain/arith-sft", split="train[:16]"))
    trainer.train()
    events = glob.glob(os.path.join(str(tmp_path / "out"), "**", "events.out.tfevents.*"), recursive=True)
    assert events, os.listdir(tmp_path / "out")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train/loss" in tags and "train/mean_token_accuracy" in tags
    assert len(accumulator.Scalars("train/loss")) == 2
    assert os.path.isfile(tmp_path / "out" / "metrics.jsonl")  # our own log is written alongside
