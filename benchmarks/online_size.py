"""Line counts of the online family (GRPO, RLOO, online DPO, PPO and what they share) before and after issue 23,
and the methods each online trainer overrides, from git history (a clean clone with its history is enough).

    python benchmarks/online_size.py                 # markdown tables: lines per module, overrides per trainer
    python benchmarks/online_size.py --after REV     # measure another revision than HEAD

Revisions: BEFORE (262f52f, before issue 23 started), ISSUE23 (0f155e9, its restructuring done, before the branches
of issues 24-27 were merged) and AFTER (HEAD). Features merged later (tool rollouts: issue 24, vision: 25,
distillation: 26, TRL surface: 27) live partly in modules of their own and partly inside the shared modules, so
every line at AFTER is attributed by `git blame -w -M -C` to the commit that wrote it, and a commit to the branch
whose merge brought it in (the issue is the number the branch name ends with: "Merge branch 'agentic24'", "Merge
b27 (…)", "Merge c26: …"). "Like-for-like" is AFTER minus the lines of those four issues' branches; lines written
on main after issue 23 (issues 21, 22, 28 and merge fixes) stay in it.

Overrides: methods (def, property) a trainer class defines — with the mixins only it uses (before issue 23, PPO's
loop API) — whose name an ancestor defines too: the posttrain base classes at that revision (read from its source,
not imported) or `transformers.Trainer`.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections import Counter

BEFORE, ISSUE23 = "262f52f", "0f155e9"

# every module of the online family at any of the revisions (a missing one counts 0 there)
SHARED = [
    "posttrain/trainers/online.py", "posttrain/trainers/online_sampling.py", "posttrain/trainers/online_batches.py",
    "posttrain/trainers/online_inspection.py", "posttrain/trainers/grpo.py", "posttrain/trainers/rloo.py",
    "posttrain/trainers/online_dpo.py", "posttrain/trainers/ppo.py", "posttrain/trainers/ppo_loop.py",
    "posttrain/trainers/distributed.py",
    "posttrain/configs/online.py", "posttrain/configs/grpo.py", "posttrain/configs/rloo.py",
    "posttrain/configs/online_dpo.py", "posttrain/configs/ppo.py",
    "posttrain/rollout/__init__.py", "posttrain/rollout/types.py", "posttrain/rollout/hf.py",
    "posttrain/rollout/engine.py", "posttrain/rollout/vllm.py", "posttrain/rollout/client.py",
    "posttrain/rollout/server.py", "posttrain/rollout/batching.py",
    "posttrain/compat.py", "posttrain/compat/__init__.py", "posttrain/compat/ppo.py", "posttrain/compat/ppo_loop.py",
    "posttrain/models/reference.py", "posttrain/trainers/anchored.py", "posttrain/losses/reduce.py",
    "posttrain/losses/policy.py",
    "posttrain/losses/value.py", "posttrain/losses/kl.py", "posttrain/algorithms/advantages.py",
    "posttrain/reporting/rollouts.py", "posttrain/rewards/runner.py",
]
# modules that only hold features of later issues (whole files, not in the like-for-like total)
LATER = {
    "posttrain/rollout/agentic.py": 24, "posttrain/rollout/tools.py": 24,
    "posttrain/rollout/vision.py": 25, "posttrain/trainers/vision.py": 25,
    "posttrain/trainers/distillation.py": 26, "posttrain/configs/distillation.py": 26,
    "posttrain/models/teacher.py": 26, "posttrain/losses/distill.py": 26,
    "posttrain/compat/module_aliases.py": 27,
}
LATER_ISSUES = range(24, 28)
# a merge's branch and issue: "Merge branch 'agentic24'" or "Merge b27 (issue 27: …)" / "Merge c26: …" (the issue is
# the number the branch name ends with)
MERGED_BRANCH = re.compile(r"^Merge (?:branch ')?([A-Za-z_-]*?(\d+))\b")
TRAINERS = ["GRPOTrainer", "RLOOTrainer", "OnlineDPOTrainer", "PPOTrainer", "DistillationTrainer", "GKDTrainer"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def source(rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def lines(rev: str, path: str) -> int:
    text = source(rev, path)
    return 0 if text is None else len(text.splitlines())


def later_issue_commits(after: str) -> dict[str, int]:
    """sha → issue, for every commit brought in by the merge of an issue-24..27 branch."""
    owner = {}
    for line in git("log", "--merges", "--format=%H %P|%s", f"{ISSUE23}..{after}").splitlines():
        shas, subject = line.split("|", 1)
        merge, first, *others = shas.split()
        found = MERGED_BRANCH.match(subject)
        if not found or int(found.group(2)) not in LATER_ISSUES or not others:
            continue
        for sha in git("rev-list", f"{first}..{others[0]}").split():
            owner[sha] = int(found.group(2))
    return owner


def blame_by_issue(after: str, path: str, owner: dict[str, int]) -> Counter:
    """Lines of `path` at `after` per later issue (24..27) that wrote them."""
    out = subprocess.run(["git", "blame", "-w", "-M", "-C", "--line-porcelain", after, "--", path],
                         capture_output=True, text=True)
    counts = Counter()
    for line in out.stdout.splitlines():
        found = re.match(r"^([0-9a-f]{40}) \d+ \d+", line)
        if found and found.group(1) in owner:
            counts[owner[found.group(1)]] += 1
    return counts


def class_table(rev: str) -> dict[str, tuple[list[str], set[str]]]:
    """Every class of posttrain/ at `rev`: name → (base names, names of the methods it defines)."""
    table = {}
    for path in git("ls-tree", "-r", "--name-only", rev, "posttrain").split():
        if not path.endswith(".py"):
            continue
        tree = ast.parse(source(rev, path) or "")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                methods = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                table.setdefault(node.name, (bases, methods))
    return table


def overrides(rev: str) -> dict[str, tuple[int, int]]:
    """Trainer → (methods it overrides, methods it defines)."""
    from transformers import Trainer

    table = class_table(rev)

    def inherited(name: str, seen: set[str]) -> set[str]:
        names = set()
        for base in table.get(name, ([], set()))[0]:
            if base in seen:
                continue
            seen.add(base)
            names |= table[base][1] if base in table else set()
            names |= inherited(base, seen)
        return names

    def own_mixins(name: str) -> list[str]:
        """Direct bases that no other class extends: the trainer's own mixins (PPO's loop API before issue 23)."""
        return [b for b in table[name][0] if b in table and not b.endswith("Trainer")
                and not any(b in bases for other, (bases, _) in table.items() if other != name)]

    result = {}
    for trainer in TRAINERS:
        if trainer not in table:
            continue
        own = set(table[trainer][1]).union(*(table[m][1] for m in own_mixins(trainer)))
        seen = set(own_mixins(trainer))
        base = set().union(*(table[b][1] | inherited(b, set()) for b in table[trainer][0]
                             if b in table and b not in seen)) | {n for n in dir(Trainer) if callable(getattr(Trainer, n, None))
                                            or isinstance(getattr(Trainer, n, None), property)}
        result[trainer] = (len(own & base), len(own))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", default="HEAD", help="the revision to measure (default HEAD)")
    after = parser.parse_args().after
    for rev in (BEFORE, ISSUE23, after):
        if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True).returncode:
            sys.exit(f"revision {rev} is not in this clone: fetch the full history (git fetch --unshallow).")
    owner = later_issue_commits(after)
    print(f"Lines (`wc -l`) at {BEFORE} (before issue 23), {ISSUE23} (issue 23's restructuring, before issues 24-27 "
          f"merged) and {after}; 'issues 24-27' = lines at {after} that `git blame -w -M -C` traces to those issues' "
          "branches; like-for-like = after − issues 24-27.\n")
    print(f"| module | {BEFORE} | {ISSUE23} | {after} | issues 24-27 | like-for-like |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = Counter()
    for path in SHARED + sorted(LATER):
        before, mid, now = lines(BEFORE, path), lines(ISSUE23, path), lines(after, path)
        if not (before or mid or now):
            continue
        later = sum(blame_by_issue(after, path, owner).values()) if now else 0
        if path in LATER:
            later = now  # the whole module is a later feature
        name = path.removeprefix("posttrain/") + (f" (issue {LATER[path]})" if path in LATER else "")
        print(f"| {name} | {before} | {mid} | {now} | {later} | {now - later} |")
        totals.update({"before": before, "mid": mid, "now": now, "later": later})
        if path not in LATER:
            totals.update({"shared_before": before, "shared_now": now})
    print(f"| **total** | **{totals['before']}** | **{totals['mid']}** | **{totals['now']}** | **{totals['later']}** "
          f"| **{totals['now'] - totals['later']}** |")
    print(f"\nAll modules: {totals['before']} → {totals['now']} lines. Shared modules (every module but the later "
          f"issues' own, with the later lines inside them): {totals['shared_before']} → {totals['shared_now']}. "
          f"Like-for-like by blame: {totals['before']} → {totals['now'] - totals['later']} "
          f"({totals['now'] - totals['later'] - totals['before']:+d}; a later issue's line rewritten since counts as "
          "like-for-like).\n")
    print("Overrides per trainer (methods a trainer class defines that an ancestor — the posttrain bases at that "
          "revision, or transformers.Trainer — defines too; a mixin only this trainer uses counts as its own; in "
          "brackets: all methods it defines).\n")
    counts = {rev: overrides(rev) for rev in (BEFORE, ISSUE23, after)}
    print(f"| trainer | {BEFORE} | {ISSUE23} | {after} |")
    print("|---|---:|---:|---:|")
    for trainer in TRAINERS:
        cells = [f"{counts[r][trainer][0]} ({counts[r][trainer][1]})" if trainer in counts[r] else "–"
                 for r in (BEFORE, ISSUE23, after)]
        print(f"| {trainer} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
