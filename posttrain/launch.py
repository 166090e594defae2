"""`posttrain <command> … --num_processes N [--accelerate_config NAME|PATH]`: the CLI starts a multi-process run
itself by building an `accelerate launch … -m posttrain <command> …` command line and exec-ing it.

Configs shipped in `posttrain/accelerate_configs/`: multi_gpu (DDP; on a machine without a GPU the same launch runs
CPU processes over gloo, alias ddp / multi_cpu), zero1, zero2, zero3 (DeepSpeed) and fsdp2. A path names any other
accelerate config file. The launched processes get the same arguments minus these two flags.
Without a GPU, DeepSpeed (its CPU accelerator, gloo) and FSDP2 run CPU processes too, in fp32 (the configs' bf16 is
for GPUs; `--mixed_precision no` is added); FSDP1 needs CUDA and is refused in one line.

Not here: what each process does (`cli.py`, trainers); how the Trainer sets up the process group (accelerate).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

from posttrain import hardware
from posttrain.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_configs")
ALIASES = {"ddp": "multi_gpu", "multi_cpu": "multi_gpu", "fsdp": "fsdp2", "deepspeed": "zero3"}
LAUNCH_FLAGS = ("--num_processes", "--accelerate_config")


class LaunchError(UserError):
    """A launch option that cannot work here (printed as one line)."""


def shipped_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def pop_launch_flags(argv: list[str]) -> tuple[int | None, str | None, list[str]]:
    """(num_processes, accelerate_config, the other arguments) from a command's arguments."""
    rest, values = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = next((f for f in LAUNCH_FLAGS if arg == f or arg.startswith(f + "=")), None)
        if name is None:
            rest.append(arg)
            i += 1
            continue
        if "=" in arg:
            values[name], i = arg.split("=", 1)[1], i + 1
        elif i + 1 < len(argv):
            values[name], i = argv[i + 1], i + 2
        else:
            raise LaunchError(f"{name} needs a value")
    num = values.get("--num_processes")
    if num is not None:
        if not num.isdigit() or int(num) < 1:
            raise LaunchError(f"--num_processes must be a positive integer, got {num!r}")
        num = int(num)
    return num, values.get("--accelerate_config"), rest


def resolve_config(name: str) -> str:
    """A shipped config name (or alias) or a path → the config file's path."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    key = ALIASES.get(name, name)
    path = os.path.join(CONFIG_DIR, f"{key}.yaml")
    if os.path.isfile(path):
        return path
    raise LaunchError(f"accelerate config {name!r} is neither a file nor a shipped config; choose one of "
                      f"{', '.join(shipped_configs() + sorted(ALIASES))} or give a path to a YAML file")


def check_config_runs_here(path: str) -> None:
    """What cannot run here is refused early, in one line: DeepSpeed without its package, FSDP1 without CUDA."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    kind = str(config.get("distributed_type", "NO")).upper()
    name = os.path.basename(path)
    fsdp_version = int((config.get("fsdp_config") or {}).get("fsdp_version", 1))
    if kind == "FSDP" and fsdp_version != 2 and not hardware.has_cuda():
        raise LaunchError(f"{name} (FSDP1) needs CUDA GPUs and this machine has none; use --accelerate_config fsdp2 "
                          "(FSDP2 also runs CPU processes) or multi_gpu")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"{name} needs DeepSpeed: pip install deepspeed (or choose --accelerate_config fsdp2)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(command: str, argv: list[str], num_processes: int | None, config: str | None) -> list[str]:
    """The `accelerate launch` command line that runs `posttrain <command> <argv>` on num_processes processes."""
    if hardware.is_multi_process_launch():
        raise LaunchError("--num_processes/--accelerate_config start a launch themselves; drop them when running "
                          "under accelerate launch or torchrun")
    path = resolve_config(config or "multi_gpu")
    check_config_runs_here(path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path,
              "--main_process_port", str(_free_port())]
    if not hardware.has_cuda():
        launch += ["--mixed_precision", "no"]  # CPU processes: fp32 (bf16 is emulated, ~30x slower: hardware.py)
    if num_processes is not None:
        launch += ["--num_processes", str(num_processes)]
    elif hardware.has_cuda():
        import torch

        launch += ["--num_processes", str(max(torch.cuda.device_count(), 1))]
    else:
        raise LaunchError("--accelerate_config on a machine without a GPU needs --num_processes N (CPU processes)")
    if num_processes == 1 and "multi_gpu" in os.path.basename(path):
        return [sys.executable, "-m", "posttrain", command, *argv]  # one process: no launcher needed
    return launch + ["-m", "posttrain", command, *argv]


def relaunch(command: str, argv: list[str]) -> None:
    """Replace this process by the launch that `argv`'s --num_processes/--accelerate_config ask for (no return)."""
    num_processes, config, rest = pop_launch_flags(argv)
    cmd = build_command(command, rest, num_processes, config)
    print("posttrain: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ)
    if not hardware.has_cuda():
        env.setdefault("OMP_NUM_THREADS", "1")  # CPU processes share the cores: one thread each by default
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo without oneCCL), no probing
    os.execve(cmd[0], cmd, env)
