"""The CLI's own multi-process launch: flags, shipped accelerate configs, the command line it builds, and an
end-to-end 2-process CPU run started by `posttrain sft … --num_processes 2`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from posttrain import launch
from posttrain.cli import main


def test_pop_launch_flags_keeps_the_rest():
    num, config, rest = launch.pop_launch_flags(["--max_steps", "3", "--num_processes", "2",
                                                 "--accelerate_config=zero2", "--beta", "0.1"])
    assert (num, config, rest) == (2, "zero2", ["--max_steps", "3", "--beta", "0.1"])


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_num_processes_is_one_line(bad):
    with pytest.raises(launch.LaunchError, match="--num_processes must be a positive integer"):
        launch.pop_launch_flags(["--num_processes", bad])


def test_shipped_configs_are_accelerate_configs():
    assert {"multi_gpu", "zero1", "zero2", "zero3", "fsdp2"} <= set(launch.shipped_configs())
    for name in launch.shipped_configs():
        with open(launch.resolve_config(name)) as f:
            config = yaml.safe_load(f)
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
    with open(launch.resolve_config("zero3")) as f:
        assert yaml.safe_load(f)["deepspeed_config"]["zero_stage"] == 3
    with open(launch.resolve_config("fsdp")) as f:
        assert yaml.safe_load(f)["fsdp_config"]["fsdp_version"] == 2
    assert launch.resolve_config("multi_cpu") == launch.resolve_config("multi_gpu")


def test_build_command_execs_accelerate_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cmd = launch.build_command("dpo", ["--beta", "0.1"], 2, None)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[4].endswith("multi_gpu.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["-m", "posttrain", "dpo", "--beta", "0.1"]
    assert launch.build_command("sft", [], 1, None)[1:4] == ["-m", "posttrain", "sft"]  # one process: no launcher


@pytest.mark.skipif(launch.hardware.has_cuda(), reason="checks the CPU launch")
@pytest.mark.parametrize("name", ["zero1", "zero3", "fsdp2"])
def test_sharded_configs_run_cpu_processes_in_fp32(monkeypatch, name):
    """DeepSpeed (CPU accelerator, gloo) and FSDP2 run CPU processes (tests/test_sharded.py); bf16 is for GPUs."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: object())  # as if DeepSpeed were installed
    cmd = launch.build_command("dpo", [], 2, name)
    assert cmd[cmd.index("--mixed_precision") + 1] == "no" and cmd[-3:] == ["-m", "posttrain", "dpo"]


@pytest.mark.skipif(launch.hardware.has_cuda(), reason="checks the no-GPU refusal")
def test_fsdp1_and_missing_deepspeed_are_one_line(capsys, tmp_path, monkeypatch):
    with open(launch.resolve_config("fsdp2")) as f:
        config = yaml.safe_load(f)
    config["fsdp_config"]["fsdp_version"] = 1
    (tmp_path / "fsdp1.yaml").write_text(yaml.safe_dump(config))
    assert main(["dpo", "--num_processes", "2", "--accelerate_config", str(tmp_path / "fsdp1.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(FSDP1) needs CUDA GPUs" in err
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    assert main(["dpo", "--num_processes", "2", "--accelerate_config", "zero3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install deepspeed" in err


def test_unknown_config_and_nested_launch_are_one_line(capsys, monkeypatch):
    assert main(["sft", "--accelerate_config", "zero9"]) == 2
    assert "choose one of" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sft", "--num_processes", "2"]) == 2
    assert "under accelerate launch or torchrun" in capsys.readouterr().err


def test_cli_starts_two_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "posttrain", "sft", "--model_name_or_path", "posttrain/tiny",
                             "--dataset_name", "posttrain/arith-sft", "--output_dir", str(out), "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                             "--num_processes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate.commands.launch" in result.stderr
    assert result.stdout.count("posttrain: done") == 1  # the summary comes from process 0 only
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["per_device_train_batch_size"] == 2 and "num_processes" not in saved
    assert (out / "model.safetensors").exists()
