"""Run TRL's own trainer tests against TRL or, with the imports swapped, against posttrain; compare the two.

    python benchmarks/trl_tests/run.py --target trl          # TRL side -> benchmarks/trl_tests/results-trl.json
    python benchmarks/trl_tests/run.py --target posttrain    # swapped  -> results-posttrain.json + TRL-TESTS.md
    python benchmarks/trl_tests/run.py --report              # only rewrite benchmarks/TRL-TESTS.md

The test files are read from a local git mirror of huggingface/trl at a pinned commit (`--trl-git`, `--commit`)
into benchmarks/trl_tests/upstream/ (git-ignored: third-party test code is input to the measurement, never part
of this repository). Nothing is downloaded: harness/standins.py builds tiny models into a private HF cache and
harness/trl_harness_plugin.py serves the `zen` datasets. Each test file runs in its own pytest process
(`taskset -c 0 nice`, one thread, a per-test and a per-file time limit). The posttrain side by default runs only
the tests that passed on the TRL side (results-trl.json), since only those count.
See benchmarks/trl_tests/README.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HARNESS = HERE / "harness"
DEFAULT_GIT = "/work/.mirror/huggingface+trl/repo"
# huggingface/trl main as of 2026-07-24 (VERSION 1.10.0.dev0): the newest TRL test suite in the mirror. The
# installed TRL is 1.16.0; tests that no longer pass against it are simply not counted (TRL side fails).
DEFAULT_COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"

# test file -> the trainer (or area) it measures
FILES = {
    "tests/test_sft_trainer.py": "SFT",
    "tests/test_dpo_trainer.py": "DPO",
    "tests/test_reward_trainer.py": "reward",
    "tests/test_kto_trainer.py": "KTO",
    "tests/test_grpo_trainer.py": "GRPO",
    "tests/test_rloo_trainer.py": "RLOO",
    "tests/experimental/test_orpo_trainer.py": "ORPO",
    "tests/experimental/test_cpo_trainer.py": "CPO",
    "tests/experimental/test_online_dpo_trainer.py": "online DPO",
    "tests/experimental/test_ppo_trainer.py": "PPO",
    "tests/test_data_utils.py": "data_utils",
    "tests/test_rewards.py": "rewards",
    "tests/test_callbacks.py": "callbacks",
}
SUPPORT = ["tests/__init__.py", "tests/experimental/__init__.py", "tests/testing_utils.py",
           "tests/testing_constants.py", "tests/data/template.jinja"]
PKG = "trl_upstream_tests"  # the tests/ package is renamed so it cannot clash with this repo's tests/
KEEP_TRL = ("trl.import_utils",)  # environment probes (is_vllm_available, …): infrastructure, not library surface

NOT_RUNNABLE = re.compile(
    r"HarnessNotRunnable|offline mode|LocalEntryNotFound|couldn't connect|Cannot find the requested files|"
    r"not cached|is not a local folder and is not a valid model identifier|OfflineModeIsEnabled|"
    r"Couldn't reach|does not appear to have a file named|Connection error", re.I)


# ------------------------------------------------------------------------------------------------ preparing


def extract(git_dir: str, commit: str, dest: Path) -> None:
    """Copy the test files at `commit` from the bare mirror into `dest` (kept if already at that commit)."""
    stamp = dest / ".commit"
    if stamp.exists() and stamp.read_text().strip() == commit:
        return
    shutil.rmtree(dest, ignore_errors=True)
    for path in list(FILES) + SUPPORT:
        blob = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], capture_output=True)
        if blob.returncode:
            print(f"warning: {path} not at {commit[:10]}: {blob.stderr.decode().strip()}", file=sys.stderr)
            continue
        out = dest / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob.stdout)
    stamp.write_text(commit)


def rewrite_imports(source: str, target: str, is_test: bool = True) -> str:
    """Route `trl` imports through import_swap (line numbers kept). For posttrain, `trl.X` becomes `posttrain.X`
    and `"trl.x"` mock/logger targets follow. For TRL too, so a name this TRL version lacks (the tests are newer
    or older than the installed TRL) fails only the tests that use it, not the whole file. `trl.import_utils`
    probes are answered by the harness on both sides (and they alone in non-test support files)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    edits = []
    package = "posttrain" if target == "posttrain" else "trl"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "trl" or node.module.startswith("trl.")):
            probe = node.module.startswith(KEEP_TRL)
            if not is_test and not probe:
                continue
            module = package + node.module[3:]
            targets = [a.asname or a.name for a in node.names]
            names = ", ".join(repr(a.name) for a in node.names)
            call = f"env_probe({names})" if probe else f"swap_import({module!r}, {names})"
            lhs = f"({', '.join(targets)})" if len(targets) > 1 else targets[0]
            stmt = f"{lhs} = __import__('import_swap').{call}"
            edits.append((node.lineno, node.end_lineno, node.col_offset, stmt))
        elif is_test and target == "posttrain" and isinstance(node, ast.Import) and any(
                a.name == "trl" or a.name.startswith("trl.") for a in node.names):
            stmts = []
            for a in node.names:
                if a.name == "trl" or a.name.startswith("trl."):
                    name = a.asname or "trl"
                    module = "posttrain" + (a.name[3:] if a.asname else "")
                    stmts.append(f"{name} = __import__('import_swap').swap_module({module!r})")
                else:
                    stmts.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
            edits.append((node.lineno, node.end_lineno, node.col_offset, "; ".join(stmts)))
    for start, end, col, stmt in sorted(edits, reverse=True):
        indent = lines[start - 1][:col]
        lines[start - 1:end] = [indent + stmt] + [""] * (end - start)
    text = "\n".join(lines) + "\n"
    if not is_test or target != "posttrain":
        return text
    return re.sub(r"""(["'])trl\.(?!import_utils)""", r"\1posttrain.", text)


def prepare(upstream: Path, work: Path, target: str) -> None:
    shutil.rmtree(work, ignore_errors=True)
    pkg = work / PKG
    shutil.copytree(upstream / "tests", pkg)
    (pkg / "conftest.py").write_text('"""TRL\'s conftest is replaced by trl_harness_plugin."""\n')
    for path in list(FILES) + ["tests/testing_utils.py"]:
        file = work / PKG / path[len("tests/"):]
        if file.exists():
            file.write_text(rewrite_imports(file.read_text(), target, is_test=path in FILES))
    (work / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    slow: slow\n    low_priority: low priority\n    invariant: invariant\n"
        "filterwarnings =\n    ignore::DeprecationWarning\n")


# ------------------------------------------------------------------------------------------------ running


def env_for(target: str, hf_home: Path, checkout: Path, out: Path) -> dict:
    env = dict(os.environ)
    paths = [str(HARNESS)] + ([str(checkout)] if target == "posttrain" else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="",
               TRL_HARNESS_OUT=str(out), TRL_HARNESS_TARGET=target,
               POSTTRAIN_CACHE=str(hf_home.parent / "posttrain-cache"))
    return env


def prefix(args) -> list[str]:
    cmd = []
    if args.cpus and shutil.which("taskset"):
        cmd += ["taskset", "-c", args.cpus]
    if shutil.which("nice"):
        cmd += ["nice"]
    return cmd + [args.python, "-m", "pytest", "-p", "trl_harness_plugin", "-p", "no:cacheprovider",
                  "-m", "not slow", "-q", "-rN", "--tb=no", "-o", "console_output_style=classic"]


def collect(args, work: Path, env: dict, rel: str) -> list[str]:
    base = [a for a in prefix(args) if a != "-q"]
    proc = subprocess.run(base + ["--collect-only", "-q", rel], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def sample(nodeids: list[str], n: int) -> list[str]:
    """A deterministic subset: the n node ids with the smallest sha1 (stable across runs and checkouts)."""
    return sorted(sorted(nodeids, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:n])


def merge_records(lines: list[dict]) -> dict:
    tests: dict[str, dict] = {}
    for rec in lines:
        cur = tests.setdefault(rec["nodeid"], {"outcome": "passed"})
        if rec.get("xfail"):
            cur["outcome"] = "xfail"
        elif rec["outcome"] == "failed":
            cur["outcome"] = "error" if rec["when"] in ("setup", "collect") else "failed"
            for key in ("error_type", "message", "library_frame", "test_frame"):
                if key in rec:
                    cur[key] = rec[key]
        elif rec["outcome"] == "skipped" and cur["outcome"] == "passed":
            cur["outcome"] = "skipped"
            cur["reason"] = rec.get("reason", "")
        if rec["when"] == "call":
            cur["duration"] = rec["duration"]
        if rec.get("path_fallbacks"):
            cur["path_fallbacks"] = rec["path_fallbacks"]
        if cur["outcome"] in ("failed", "error") and NOT_RUNNABLE.search(
                f"{cur.get('error_type', '')} {cur.get('message', '')}"):
            cur["outcome"] = "not_runnable"
    return tests


def run_file(args, work: Path, env: dict, rel: str, nodeids: list[str] | None) -> dict:
    out = Path(env["TRL_HARNESS_OUT"])
    out.unlink(missing_ok=True)
    cmd = prefix(args) + (nodeids if nodeids else [rel])
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.file_timeout)
        rc, tail = proc.returncode, proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ["file time limit reached"]
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return {"rc": rc, "seconds": round(time.time() - started, 1), "summary": " ".join(tail),
            "tests": merge_records(records)}


def merge_results(into: Path, sources: list[Path]) -> None:
    results = json.loads(into.read_text()) if into.exists() else {"files": {}}
    for src in sources:
        other = json.loads(src.read_text())
        for key, value in other.items():
            if key != "files" and results.get(key) is None:
                results[key] = value
        for path, res in other["files"].items():
            if path in results["files"]:
                old = results["files"][path]
                old["tests"].update(res["tests"])
                old["seconds"] = round(old["seconds"] + res["seconds"], 1)
            else:
                results["files"][path] = res
    into.write_text(json.dumps(results, indent=1, sort_keys=True))


def git_head(path: Path) -> str:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=["trl", "posttrain"])
    p.add_argument("--report", action="store_true", help="only write benchmarks/TRL-TESTS.md from the JSON files")
    p.add_argument("--files", nargs="*", help="subset of test files or trainer names (SFT, DPO, …)")
    p.add_argument("-k", dest="keyword", help="regex on node ids (debugging; results go to .cache/results-<target>-k.json)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these results files (from parallel --out "
                   "runs) into results-<target>.json, test by test, then write the report")
    p.add_argument("--only", help="a file of node ids (one a line) to run; results merge into --out")
    p.add_argument("--sample", type=int, default=0, help="run at most N tests per file (deterministic subset)")
    p.add_argument("--all", action="store_true", help="posttrain side: run every test, not only TRL-passing ones")
    p.add_argument("--trl-results", default=str(HERE / "results-trl.json"))
    p.add_argument("--out", help="results JSON (default benchmarks/trl_tests/results-<target>.json)")
    p.add_argument("--checkout", default=str(REPO), help="the posttrain checkout to test (default: this one)")
    p.add_argument("--trl-git", default=DEFAULT_GIT)
    p.add_argument("--commit", default=DEFAULT_COMMIT)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--cpus", default="0", help="taskset CPU list ('' for none)")
    p.add_argument("--test-timeout", type=int, default=180)
    p.add_argument("--file-timeout", type=int, default=3600)
    p.add_argument("--cache", default=str(HERE / ".cache"))
    args = p.parse_args(argv)

    from report import write_report  # noqa: E402  (harness-local module)

    if args.report:
        write_report(HERE, REPO / "benchmarks" / "TRL-TESTS.md")
        return 0
    if not args.target:
        p.error("--target or --report is required")
    if args.merge:
        merge_results(HERE / f"results-{args.target}.json", [Path(m) for m in args.merge])
        write_report(HERE, REPO / "benchmarks" / "TRL-TESTS.md")
        return 0

    upstream = HERE / "upstream"
    extract(args.trl_git, args.commit, upstream)
    cache = Path(args.cache).resolve()
    hf_home = cache / "hf"
    sys.path.insert(0, str(HARNESS))
    from standins import build_hub_cache

    built = build_hub_cache(hf_home)
    failed = {k: v for k, v in built.items() if v != "ok"}
    if failed:
        print(f"stand-ins not built: {failed}", file=sys.stderr)
    # per-process work copy and records, so runs in parallel (other --out, other --cache) cannot collide; the
    # last one is kept as .cache/work-<target> for debugging by hand
    work = cache / f"work-{args.target}-{os.getpid()}"
    prepare(upstream, work, args.target)
    checkout = Path(args.checkout).resolve()

    selected = list(FILES)
    if args.files:
        wanted = {f.lower() for f in args.files}
        selected = [f for f in FILES if f.lower() in wanted or FILES[f].lower() in wanted
                    or Path(f).name.lower() in wanted]
    trl_results = None
    if args.target == "posttrain" and not args.all and Path(args.trl_results).exists():
        trl_results = json.loads(Path(args.trl_results).read_text())

    out_path = Path(args.out or HERE / (f"results-{args.target}.json" if not args.keyword else
                                        f".cache/results-{args.target}-k.json"))
    results = json.loads(out_path.read_text()) if out_path.exists() and (
        args.files or args.keyword or args.only) else {}
    results.update(target=args.target, trl_commit=args.commit, trl_version=_trl_version(args.python),
                   posttrain_commit=git_head(checkout) if args.target == "posttrain" else None,
                   sample=args.sample or None, only_trl_passing=trl_results is not None)
    results.setdefault("files", {})
    for path in selected:
        rel = f"{PKG}/{path[len('tests/'):]}"
        if not (work / rel).exists():
            continue
        env = env_for(args.target, hf_home, checkout, cache / f"records-{args.target}-{os.getpid()}.jsonl")
        nodeids = None
        if trl_results is not None:
            passed = trl_results["files"].get(path, {}).get("tests", {})
            nodeids = sorted(n for n, t in passed.items() if t["outcome"] == "passed")
            if not nodeids:
                results["files"][path] = {"rc": None, "seconds": 0, "summary": "no TRL-passing tests", "tests": {}}
                continue
        elif args.sample or args.keyword:
            nodeids = collect(args, work, env, rel)
            if args.sample:
                nodeids = sample(nodeids, args.sample)
        if args.only:
            wanted_ids = set(Path(args.only).read_text().split())
            nodeids = [n for n in (nodeids if nodeids is not None else collect(args, work, env, rel))
                       if n in wanted_ids]
            if not nodeids:
                continue
        if args.keyword:
            nodeids = [n for n in nodeids if re.search(args.keyword, n)]
            if not nodeids:
                continue
        print(f"[{time.strftime('%H:%M:%S')}] {args.target} {path}: "
              f"{len(nodeids) if nodeids is not None else 'all'} tests", flush=True)
        res = run_file(args, work, env, rel, nodeids)
        if args.only and path in results["files"]:  # a partial re-run: merge into the file's earlier records
            old = results["files"][path]
            old["tests"].update(res["tests"])
            old["seconds"] = round(old["seconds"] + res["seconds"], 1)
            res = old
        counts = {}
        for t in res["tests"].values():
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        print(f"    {res['seconds']} s rc={res['rc']} {counts}", flush=True)
        results["files"][path] = res
        out_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    (cache / f"records-{args.target}-{os.getpid()}.jsonl").unlink(missing_ok=True)
    keep = cache / f"work-{args.target}"
    shutil.rmtree(keep, ignore_errors=True)
    work.rename(keep)
    if args.target == "posttrain" and not args.keyword and out_path == HERE / "results-posttrain.json":
        write_report(HERE, REPO / "benchmarks" / "TRL-TESTS.md")
    return 0


def _trl_version(python: str) -> str:
    proc = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return proc.stdout.strip() or "not installed"


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
