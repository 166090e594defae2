"""Loading by name: local json/jsonl/csv/parquet files and directories, built-in sets, mixtures; model paths;
SFT data paths for ShareGPT rows, formatting_func, pre-tokenised data and skip_prepare_dataset."""

import json
import math
import types

import datasets
import pytest

from posttrain import SFTConfig, SFTTrainer
from posttrain.data.loading import load_any_dataset, load_mixture, load_train_eval
from posttrain.models.builtin import builtin_model_path
from posttrain.models.loading import load_pretrained_model

ROWS = [{"prompt": f"Question: {i} + 1?\nAnswer:", "completion": f" {i + 1}"} for i in range(6)]


@pytest.mark.parametrize("ext", ["json", "jsonl", "csv", "parquet"])
def test_local_files(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    ds = datasets.Dataset.from_list(ROWS)
    if ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    else:
        getattr(ds, f"to_{ext}")(str(path))
    loaded = load_any_dataset(str(path), split="train")
    assert loaded.column_names == ["prompt", "completion"] and len(loaded) == 6


def test_local_saved_directory_and_missing_path(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_any_dataset(str(tmp_path / "dd"), split="train")) == 6
    with pytest.raises(ValueError, match="does not exist"):
        load_any_dataset(str(tmp_path / "nope.jsonl"))


def test_builtin_by_name_with_splits():
    args = types.SimpleNamespace(datasets=None, dataset_name="posttrain/arith-sft", dataset_config=None,
                                 dataset_train_split="train[:10]", dataset_test_split="test", dataset_streaming=False)
    train, evaluation = load_train_eval(args, want_eval=True)
    assert len(train) == 10 and len(evaluation) == 1000


def test_mixture(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    mixed = load_mixture([{"path": str(path)},
                          {"path": "posttrain/arith-sft", "split": "train[:4]", "columns": ["prompt", "completion"]}])
    assert len(mixed) == 10
    with pytest.raises(ValueError, match="with a 'path'"):
        load_mixture([{"name": "x"}])


def test_model_from_local_dir_and_missing_path(tmp_path):
    model = load_pretrained_model(builtin_model_path("posttrain/tiny"))
    assert model.dtype.is_floating_point
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained_model(str(tmp_path / "missing-model"))
    with pytest.raises(ValueError, match="available"):
        load_pretrained_model("posttrain/nonexistent")


def _args(tmp_path, **kw):
    return SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     save_strategy="no", **kw)


def test_sharegpt_rows_are_converted(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "1 + 1?"}, {"from": "gpt", "value": "2"}]}] * 4
    trainer = SFTTrainer(builtin_model_path("posttrain/tiny"), args=_args(tmp_path, assistant_only_loss=True),
                         train_dataset=datasets.Dataset.from_list(rows))
    row = trainer.train_dataset[0]
    assert trainer.processing_class.decode([i for i in row["labels"] if i != -100]) == "2<|im_end|>"


def test_formatting_func_and_pretokenized(tmp_path):
    raw = datasets.Dataset.from_list([{"q": "1 + 1", "a": "2"}] * 4)
    trainer = SFTTrainer("posttrain/tiny", args=_args(tmp_path), train_dataset=raw,
                         formatting_func=lambda ex: f"{ex['q']} = {ex['a']}")
    assert trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"]) == "1 + 1 = 2<|im_end|>"
    pretokenized = datasets.Dataset.from_list([{"input_ids": [5, 6, 7, 8]}] * 4)
    trainer = SFTTrainer("posttrain/tiny", args=_args(tmp_path), train_dataset=pretokenized)
    assert trainer.train_dataset[0]["labels"] == [5, 6, 7, 8]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_skip_prepare_dataset(tmp_path):
    ready = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}] * 4)
    trainer = SFTTrainer("posttrain/tiny", args=_args(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
                         train_dataset=ready)
    assert trainer.train_dataset is ready


def test_empty_and_none_rows(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        SFTTrainer("posttrain/tiny", args=_args(tmp_path),
                   train_dataset=datasets.Dataset.from_list(ROWS).select([]))
    bad = datasets.Dataset.from_list(ROWS[:2] + [{"prompt": "Q", "completion": None}])
    with pytest.raises(ValueError, match="empty or missing 'completion'"):
        SFTTrainer("posttrain/tiny", args=_args(tmp_path), train_dataset=bad)
