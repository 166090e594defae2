"""pytest plugin loaded (`-p trl_harness_plugin`) when TRL's own tests run under benchmarks/trl_tests/run.py.

It replaces TRL's tests/conftest.py: offline `zen` datasets instead of the Hub, `use_cpu=True` on TRL configs
(TRL's own conftest does this on CPU machines; posttrain chooses CPU defaults itself), a per-test time limit
(SIGALRM), and one JSON line per test phase written to $TRL_HARNESS_OUT with the outcome and, for a failure,
the exception type, its first message line and the innermost frame inside the library under test.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import traceback

import pytest

_OUT = os.environ.get("TRL_HARNESS_OUT")
_TARGET = os.environ.get("TRL_HARNESS_TARGET", "trl")
_TIMEOUT = int(os.environ.get("TRL_HARNESS_TEST_TIMEOUT", "180"))


class HarnessNotRunnable(RuntimeError):
    """A Hub resource the harness has no offline stand-in for (vision datasets, tool-call data, …)."""


class _DropLoadReport(logging.Filter):
    def filter(self, record):
        return "LOAD REPORT" not in record.getMessage()


def pytest_configure(config):
    import datasets
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in ("transformers.modeling_utils", "transformers.modeling_layers", "transformers.integrations.peft"):
        logging.getLogger(name).addFilter(_DropLoadReport())

    from standins import zen_dataset

    original = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if path == "trl-internal-testing/zen":
            return zen_dataset(name or kwargs.get("config_name"), split, streaming)
        if isinstance(path, str) and path.count("/") == 1 and not os.path.exists(path):
            raise HarnessNotRunnable(f"no offline stand-in for Hub dataset {path!r} (config {name!r})")
        return original(path, name, *args, split=split, streaming=streaming, **kwargs)

    datasets.load_dataset = load_dataset


@pytest.fixture(autouse=True)
def _trl_use_cpu(monkeypatch):
    if _TARGET != "trl":
        yield
        return
    import torch

    if torch.cuda.is_available():
        yield
        return
    from trl.trainer.base_config import _BaseConfig

    original = _BaseConfig.__post_init__

    def post_init(self):
        self.use_cpu = True
        original(self)

    monkeypatch.setattr(_BaseConfig, "__post_init__", post_init)
    yield


@pytest.fixture(autouse=True)
def _time_limit(request):
    def expired(signum, frame):
        raise TimeoutError(f"harness: test ran past {_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    gc.collect()


def _fallbacks_used(item) -> list[str]:
    """TRL import paths posttrain lacks whose name the test's source uses (resolved from posttrain's top level)."""
    import sys

    swap = sys.modules.get("import_swap")
    if swap is None or not swap.FALLBACKS:
        return []
    import inspect
    import re

    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return []
    return sorted(path for name, path in swap.FALLBACKS.items() if re.search(rf"\b{re.escape(name)}\b", source))


def _library_frame(excinfo) -> str:
    """The innermost traceback frame inside the library under test (posttrain/ or trl/), as `file:line in func`."""
    marker = os.sep + ("posttrain" if _TARGET == "posttrain" else "trl") + os.sep
    found = ""
    for entry in traceback.extract_tb(excinfo.tb):
        if marker in entry.filename and "trl_upstream_tests" not in entry.filename:
            path = entry.filename.split(marker, 1)[1]
            found = f"{marker.strip(os.sep)}/{path}:{entry.lineno} in {entry.name}"
    return found


def _test_frame(excinfo) -> str:
    found = ""
    for entry in traceback.extract_tb(excinfo.tb):
        if "trl_upstream_tests" in entry.filename:
            found = f"{os.path.basename(entry.filename)}:{entry.lineno}: {(entry.line or '').strip()[:160]}"
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _OUT:
        return
    if report.when != "call" and report.passed:
        return
    record = {"nodeid": item.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": round(report.duration, 3)}
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.when == "call":
        used = _fallbacks_used(item)
        if used:
            record["path_fallbacks"] = used
    excinfo = call.excinfo
    if report.skipped and excinfo is not None:
        record["reason"] = str(excinfo.value)[:300]
    elif report.failed and excinfo is not None:
        message = str(excinfo.value).strip()
        record["error_type"] = excinfo.type.__name__
        record["message"] = message.splitlines()[0][:400] if message else ""
        record["library_frame"] = _library_frame(excinfo)
        record["test_frame"] = _test_frame(excinfo)
    if report.failed and excinfo is not None:
        traceback.clear_frames(excinfo.tb)
    with open(_OUT, "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    if _OUT and report.failed:
        with open(_OUT, "a") as f:
            text = str(report.longrepr)
            last = [line for line in text.splitlines() if line.startswith("E ")]
            f.write(json.dumps({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                                "error_type": "CollectionError",
                                "message": (last[-1][2:].strip() if last else text.splitlines()[-1])[:400]}) + "\n")
