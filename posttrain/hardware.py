"""What this machine can do, and the defaults that follow from it.

Lives here: bf16 detection (GPU and CPU), the default precision for a run, thread settings for CPU runs.
Not here: anything that loads a model or touches a trainer — configs call these when they resolve their defaults.

Why it matters: on a CPU without AVX512-BF16/AMX, bf16 matmuls fall back to a scalar path that is ~30x slower
than fp32 (measured on this project's 2-core CI machine: a tiny-model step took 29.8 s with autocast-bf16 vs
0.87 s in fp32), so a run must never silently pick bf16 there.
"""

from __future__ import annotations

import functools
import os
import platform

# the dtypes answers may be decoded in (evaluation, `posttrain pairs`, a pipeline's evaluation): float32, bfloat16
# (only where native), auto (bfloat16 where native, else float32) — `evaluation.decoding_dtype` resolves them
DECODING_DTYPES = ("float32", "bfloat16", "auto")
DECODING_DTYPES_TEXT = ", ".join(DECODING_DTYPES[:-1]) + " or " + DECODING_DTYPES[-1]  # for error messages


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_multi_process_launch() -> bool:
    """True inside a process started by torchrun / `accelerate launch` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flags_have_bf16()
    except Exception:  # pragma: no cover - older torch or exotic builds
        return _cpu_flags_have_bf16()


def _cpu_flags_have_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon: no /proc, bf16 is native on M2+
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def accelerator_supports_bf16() -> bool:
    import torch

    if has_cuda():
        return torch.cuda.is_bf16_supported()
    return False


def default_bf16(use_cpu: bool = False) -> bool:
    """bf16 mixed precision only where the hardware runs it natively (a bf16-capable GPU)."""
    if use_cpu or not has_cuda():
        return False
    return accelerator_supports_bf16()


def bf16_is_slow_here(use_cpu: bool = False) -> bool:
    """True when bf16 was asked for on a device that emulates it (the ~30x slowdown case)."""
    if has_cuda() and not use_cpu:
        return not accelerator_supports_bf16()
    return not cpu_has_fast_bf16()


def describe() -> dict[str, str]:
    """Hardware facts for `posttrain env` and benchmark reports."""
    import torch

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "cpu capability": str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()),
        "cpu native bf16": str(cpu_has_fast_bf16()),
        "cuda": str(has_cuda()),
    }
    if has_cuda():
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["gpu bf16"] = str(accelerator_supports_bf16())
    return info
