"""benchmarks/TRL-TESTS.md from results-trl.json and results-posttrain.json: pass rates and failure causes.

A test counts for a trainer when it passed against TRL; the rate is how many of those pass against posttrain.
Posttrain failures are grouped by cause: the exception normalised (quoted names kept, numbers and paths dropped),
so one missing config field or one missing helper is one line with its count and example tests.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

CATEGORIES = {
    "missing name": "a TRL import (module path or name) posttrain lacks",
    "missing config field": "a config field TRL has, refused by posttrain's config",
    "unexpected kwarg": "a constructor/function argument TRL accepts",
    "missing attribute": "an attribute TRL's objects have (trainer, collator, config)",
    "refused input": "posttrain refuses the call with its one-line UserError where TRL runs",
    "behaviour assertion": "runs, but an assertion on the result fails",
    "crash": "another exception inside posttrain or the test",
    "timeout": "ran past the per-test limit",
    "needs the Hub": "posttrain tried to download something TRL did not need",
}


# Failures that are decided differences, not gaps: (regex on the node id, expected error text, why). A test counts as
# deliberate only while it still fails for that reason (the error type or message contains the text); each is also
# written in the README or the module that makes the choice.
DELIBERATE = [
    (r"::test_tag_added(_peft)?$", "'trl' in",
     "model tags and cards say `posttrain` and the method, not `trl`: the model was not trained with TRL"),
    (r"::test_train_model_dtype$", "NonFiniteError",
     "float16 at learning_rate 0.1 on the CPU: TRL's loss turns non-finite too (measured on the SFT test: loss 8.3, "
     "8.5, 8.0, 161.7, then 0.0 with grad_norm nan; the test only checks that the weights changed — to NaN); "
     "posttrain stops with NonFiniteError after 5 non-finite steps in a row instead of training NaN into the weights"),
    (r"::test_warning_raised_all_rewards_none$", "No reward function scored",
     "a batch that no reward function scored (all None/NaN) is an error, not a warning followed by training on zero "
     "advantages (README, 'Kept on purpose')"),
    (r"::test_custom_position_ids_but_no_padding_free$", "position_ids",
     "packed rows (`seq_lengths`) collated without padding_free keep per-document positions, so no token attends "
     "across documents; TRL drops seq_lengths there (data/collators.py)"),
    (r"::test_padding_free_without_packing_and_max_length_raises$", "DID NOT RAISE",
     "padding-free batches without packing are still cut to max_length (TRL cannot, so it refuses the combination)"),
    (r"::test_liger_kernel_with_peft_lm_head_raises$", "DID NOT RAISE",
     "TRL refuses because Liger's fused loss reads lm_head.weight and skips a LoRA adapter on lm_head; posttrain's "
     "loss calls the head module (adapter included) and never uses Liger's loss, so the adapter trains"),
    (r"::test_(orpo|cpo)_trainer\[t5-", "encoder-decoder",
     "encoder-decoder models (T5) are out of scope: posttrain trains decoder-only models and refuses others in one "
     "line at construction (TRL's experimental ORPO/CPO keep a T5 path)"),
    (r"(ORPO|CPO)Trainer::test_init_with_eval_dataset\[", "chosen_input_ids",
     "every pairwise trainer's data is tokenised once in TRL 1.16 DPOTrainer's columns (prompt_ids, chosen_ids, "
     "rejected_ids); TRL's experimental ORPO/CPO keep their older chosen_input_ids/chosen_labels layout"),
    (r"::test_generate_rollout_func_raises_when_required_keys_are_missing$", "_generate",
     "calls TRL's private `_generate` on a hand-built trainer; posttrain checks a rollout_func's keys in "
     "rollout/agentic.py with its own one-line error (TRL internals are not mirrored, README)"),
]


def deliberate(nodeid: str, test: dict) -> str | None:
    """Why a failing test is a decided difference, or None."""
    text = f"{test.get('error_type', '')} {test.get('message', '')} {test.get('test_frame', '')}"
    for pattern, expected, why in DELIBERATE:
        if re.search(pattern, nodeid) and expected in text:
            return why
    return None


def cause(test: dict) -> tuple[str, str]:
    """(category, normalised cause) of one failed test."""
    etype, msg = test.get("error_type", ""), test.get("message", "")
    if test["outcome"] == "not_runnable":  # passed with TRL, but posttrain wanted the Hub
        return "needs the Hub", _norm(msg)
    if etype == "MissingName" or msg.startswith("missing name:"):
        where = re.match(r"missing name: (\S+)", msg)
        return "missing name", f"missing name {where.group(1) if where else msg}"
    m = re.search(r"No module named '([\w.]+)'", msg)
    if etype == "ModuleNotFoundError" and m and m.group(1).startswith("posttrain"):
        return "missing name", f"missing module {m.group(1)}"
    m = re.search(r"module '(posttrain[\w.]*)' has no attribute '(\w+)'", msg)
    if m:
        return "missing name", f"missing name {m.group(1)}.{m.group(2)}"
    m = re.search(r"(\w+) got an unexpected option '(\w+)'", msg)
    if m:
        return "missing config field", f"{m.group(1)} has no field '{m.group(2)}'"
    m = re.search(r"(\S+)\(\) got an unexpected keyword argument '(\w+)'", msg)
    if m:
        return "unexpected kwarg", f"{m.group(1)}() takes no '{m.group(2)}'"
    m = re.search(r"'?(\w+)'? object has no attribute '(\w+)'", msg) or re.search(
        r"type object '(\w+)' has no attribute '(\w+)'", msg)
    if etype == "AttributeError" and m:
        return "missing attribute", f"{m.group(1)}.{m.group(2)} missing"
    if etype == "TimeoutError" or test.get("outcome") == "timeout":
        return "timeout", "ran past the per-test limit"
    if etype in ("AssertionError", "Failed") or etype.endswith("AssertionError"):
        frame = test.get("test_frame", "")  # the failing line of the test: shared by its parametrisations
        where = frame.split(": ", 1)[-1] if frame else re.sub(r"\{[^{}]*\}|\[[^\[\]]*\]", "…", msg)
        return "behaviour assertion", f"{_norm(where)[:140]}"
    if etype.startswith("User"):  # posttrain's own one-line refusals
        return "refused input", f"{etype}: {_norm(msg)[:160]}"
    lib = test.get("library_frame", "")
    return "crash", f"{etype}: {_norm(msg)[:140]}" + (f" [{lib.split(' in ')[0].rsplit(':', 1)[0]}]" if lib else "")


def _norm(text: str) -> str:
    text = re.sub(r"/[\w./+-]*/", "…/", text)
    text = re.sub(r"(?<![\w'])-?\d+(\.\d+)?(e-?\d+)?(?![\w'])", "N", text)
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    return text.strip()


def _outcome(results: dict | None, path: str, nodeid: str) -> str | None:
    if results is None:
        return None
    return results.get("files", {}).get(path, {}).get("tests", {}).get(nodeid, {}).get("outcome")


def write_report(here: Path, out: Path) -> None:
    trl_path, pt_path = here / "results-trl.json", here / "results-posttrain.json"
    trl = json.loads(trl_path.read_text()) if trl_path.exists() else None
    pt = json.loads(pt_path.read_text()) if pt_path.exists() else None
    if trl is None:
        out.write_text("# TRL's tests against posttrain\n\nNo results-trl.json yet: run the TRL side first.\n")
        return
    import run  # FILES, the trainer names

    lines = ["# TRL's own trainer tests, with the import swapped to posttrain", ""]
    lines += [
        f"TRL tests at huggingface/trl@{trl['trl_commit'][:10]} (the newest in the local mirror) run against "
        f"TRL {trl.get('trl_version')} and, with `from trl…` rewritten to `from posttrain…`, against posttrain "
        f"{(pt or {}).get('posttrain_commit') or '(not run)'}. Offline: tiny random-init stand-ins for the Hub "
        "models, generated `zen` datasets. A test counts when it passes against TRL; the rate is the share of "
        "those that also pass against posttrain. Produced by `benchmarks/trl_tests/run.py` "
        "(see benchmarks/trl_tests/README.md).", ""]
    if trl.get("sample") or (pt or {}).get("sample"):
        lines += [f"**Sampled**: at most {trl.get('sample') or pt.get('sample')} tests per file "
                  "(deterministic: smallest sha1 of the node id).", ""]
    lines += ["Two rates: **by name** resolves a TRL import path posttrain lacks (`trl.experimental.orpo.ORPOConfig`) "
              "to posttrain's top-level export of that name when there is one; **by TRL path** also requires the "
              "module path itself (a test that uses such a name counts as failing).", ""]
    lines += ["| area | tests run (TRL) | pass with TRL | pass with posttrain (by name) | % | by TRL path | % | "
              "posttrain fails | skipped (GPU/vLLM/liger/…) | not runnable offline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    failures = []
    tot = Counter()
    for path, area in run.FILES.items():
        tfile = trl.get("files", {}).get(path)
        if not tfile:
            continue
        tests = tfile["tests"]
        counts = Counter(t["outcome"] for t in tests.values())
        passing = [n for n, t in tests.items() if t["outcome"] == "passed"]
        pt_pass = pt_strict = 0
        pt_fail = 0
        for n in passing:
            o = _outcome(pt, path, n)
            if o == "passed":
                pt_pass += 1
                if not pt["files"][path]["tests"][n].get("path_fallbacks"):
                    pt_strict += 1
            elif o is not None:
                pt_fail += 1
                failures.append((area, n, pt["files"][path]["tests"][n]))
        ran_pt = pt_pass + pt_fail
        pct = f"{100 * pt_pass / ran_pt:.0f}%" if ran_pt else "–"
        spct = f"{100 * pt_strict / ran_pt:.0f}%" if ran_pt else "–"
        lines.append(f"| {area} | {len(tests)} | {len(passing)} | {pt_pass if pt else '–'} | {pct} | "
                     f"{pt_strict if pt else '–'} | {spct} | "
                     f"{pt_fail if pt else '–'} | {counts['skipped'] + counts['xfail']} | {counts['not_runnable']} |")
        if area not in ("data_utils", "rewards", "callbacks", "PPO"):
            tot.update(passing=len(passing), pt_pass=pt_pass, pt_strict=pt_strict, ran=ran_pt)
    if tot["ran"]:
        lines.append(f"| **trainers (SFT…online DPO)** | | {tot['passing']} | {tot['pt_pass']} | "
                     f"**{100 * tot['pt_pass'] / tot['ran']:.0f}%** | {tot['pt_strict']} | "
                     f"**{100 * tot['pt_strict'] / tot['ran']:.0f}%** | {tot['ran'] - tot['pt_pass']} | | |")
    lines += ["", "TRL-side failures (not counted) are in results-trl.json; a test the TRL side could not run "
              "offline (a vision model, a tool-call dataset, …) is 'not runnable'.", ""]
    decided = [(a, n, t, deliberate(n, t)) for a, n, t in failures]
    decided = [(a, n, why) for a, n, t, why in decided if why]
    shared = tot["ran"] - sum(1 for a, _, _ in decided if a not in ("data_utils", "rewards", "callbacks", "PPO"))
    if tot["ran"] and decided:
        lines += [f"**Tests whose behaviour we share** (the trainers, less the {tot['ran'] - shared} failing for a "
                  f"deliberate difference, listed below): {tot['pt_pass']} of {shared} = "
                  f"**{100 * tot['pt_pass'] / shared:.0f}%** by name, {tot['pt_strict']} of {shared} = "
                  f"**{100 * tot['pt_strict'] / shared:.0f}%** by TRL path.", ""]
        lines += ["## Deliberate differences", "", "| tests | areas | why |", "|---:|---|---|"]
        by_why = defaultdict(list)
        for area, _, why in decided:
            by_why[why].append(area)
        for why, areas in sorted(by_why.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {len(areas)} | {', '.join(f'{a} {c}' for a, c in Counter(areas).most_common())} | "
                         f"{_cell(why)} |")
        lines.append("")
        failures = [(a, n, t) for a, n, t in failures if not deliberate(n, t)]
    if not failures:
        out.write_text("\n".join(lines) + "\n")
        return

    by_cat = Counter()
    by_cause = defaultdict(list)
    for area, nodeid, test in failures:
        cat, key = cause(test)
        by_cat[cat] += 1
        by_cause[(cat, key)].append((area, nodeid))
    lines += ["## Posttrain failures by category (deliberate differences left out)", "", "| category | tests | meaning |",
              "|---|---:|---|"]
    for cat in sorted(by_cat, key=lambda c: (-by_cat[c], c)):
        lines.append(f"| {cat} | {by_cat[cat]} | {CATEGORIES.get(cat, '')} |")
    helpers = ("data_utils", "rewards", "callbacks")
    for title, group in (("Top causes in the trainers (SFT … online DPO, PPO)", lambda a: a not in helpers),
                         ("Top causes in the helpers (data_utils, rewards, callbacks)", lambda a: a in helpers)):
        ranked = sorted(((k, [i for i in v if group(i[0])]) for k, v in by_cause.items()), key=lambda kv: (
            -len(kv[1]), kv[0]))
        ranked = [(k, v) for k, v in ranked if v]
        if not ranked:
            continue
        lines += ["", f"## {title}", "", "| # | tests | category | cause | areas | example tests |",
                  "|---:|---:|---|---|---|---|"]
        for i, ((cat, key), items) in enumerate(ranked[:30], 1):
            areas = ", ".join(f"{a} {c}" for a, c in Counter(a for a, _ in items).most_common())
            examples = "<br>".join(f"`{n.split('::', 1)[1][:90]}`" for _, n in items[:3])
            lines.append(f"| {i} | {len(items)} | {cat} | {_cell(key)} | {areas} | {examples} |")
        rest = sum(len(v) for _, v in ranked[30:])
        if rest:
            lines += ["", f"… and {rest} more tests in {len(ranked) - 30} smaller causes (results-posttrain.json)."]
    lines += ["", "## Top causes per area", ""]
    for area in dict.fromkeys(a for a, _, _ in failures):
        mine = Counter(cause(t) for a, _, t in failures if a == area)
        top = "; ".join(f"{_cell(key)} ({n})" for (_, key), n in mine.most_common(8))
        lines.append(f"- **{area}** ({sum(mine.values())} failing): {top}")
    lines += ["", "## Every posttrain failure", "", "<details><summary>by area</summary>", ""]
    for area in dict.fromkeys(a for a, _, _ in failures):
        lines += [f"### {area}", ""]
        for a, nodeid, test in failures:
            if a == area:
                cat, key = cause(test)
                lines.append(f"- `{nodeid.split('::', 1)[1]}` — {cat}: {_cell(key)}")
        lines.append("")
    lines += ["</details>", ""]
    out.write_text("\n".join(lines) + "\n")


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped."""
    return text.replace("|", "\\|")
