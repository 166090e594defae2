"""Distillation demo with a real teacher: on-policy distillation vs SFT on the teacher's samples vs GKD, at equal
training time, measured on held-out prompts by the KL to the teacher (both directions) and the task accuracy.

    # training (one core) and evaluation of its snapshots (another core, as they appear) side by side:
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/distill_demo.py --phase train --teacher DIR --seconds 900
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/distill_demo.py --phase eval --teacher DIR --seconds 900
    python benchmarks/distill_demo.py --phase all ...          # both in one process, one after the other
    python benchmarks/distill_demo.py --phase table --out X.json  # the markdown tables of a finished run

Teacher: `--teacher` (default the built-in SmolLM2-135M-Instruct, 30 layers; the run in benchmarks/DISTILLATION.md
uses that model after 60 steps of SFT on `posttrain/wordmath-sft`, which solves 39% of the held-out questions
instead of 7%). Student: the teacher's embeddings, `--student_layers` of its layers, final norm and head
(`distill_compare.student_from_teacher`: the same tokenizer by construction); which layers: `--student_init ends`
(default: the first ⌈n/2⌉ and last ⌊n/2⌋, 30 → 6: 0-2 and 27-29), `spread` (evenly from first to last) or `first`.
Of the 6-layer picks measured ("ends", "spread", every 5th, the first 6, the last 6, …) "ends" started closest to
the teacher (forward KL 8.2 nats/token on teacher samples against 12.5 for the first 6 and 19.4 for "spread"; a
uniform guess scores about 10): all are far from it — a deep narrow model does not survive losing 24 of 30 layers.
Task: `posttrain/wordmath-prompts`: the first `--train_prompts` rows of its train split train, the first
`--eval_prompts` rows of its test split are held out (the two are disjoint slices of one pool, checked here; the
teacher's SFT data is a third slice).

1. The teacher samples one completion (T = 1, full distribution, ≤ `--max_new_tokens`) for every training prompt
   (the SFT and GKD data; its cost is reported, not charged to any method) and every held-out prompt.
2. Each method trains a fresh copy of the student for `--seconds` of training time — the process's CPU time from the
   start of `train()` (one thread: equal to wall-clock on an idle core, not inflated by other processes on a shared
   one), every phase included (sampling, teacher pass, update); the clock is paused while a snapshot of the student
   is written (every `--snapshot` seconds and at the end). Same learning rate, prompts per step, completion length:
     on-policy  DistillationTrainer, β = 1 (reverse KL, TRL's default), the student samples at T = 1;
     sft        SFTTrainer on the teacher's samples (sequence-level KD, off-policy);
     gkd        GKDTrainer, λ = 0.5, β = 0.5 (TRL's defaults), student samples at T = 1: half the generation
                batches on-policy, half the teacher's samples.
3. Every snapshot (and the initial student) is scored on the held-out prompts, all per completion token, exact over
   the vocabulary, teacher-forced:
     on the student's own samples (T = 1, fixed seed): reverse KL(student ‖ teacher) — what on-policy optimises —
       and forward KL(teacher ‖ student);
     on the teacher's samples: forward KL(teacher ‖ student) — what SFT on those samples optimises — and reverse;
     task accuracy: greedy answers scored by `accuracy_reward` (the teacher's too).
Writes the JSON (`--out`) with every curve point, prints markdown tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_compare import student_from_teacher, student_layer_indices  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("on-policy", "sft", "gkd")
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


# ---- data and the teacher's samples --------------------------------------------------------------------------------

def load_prompts(opts):
    from posttrain.data.loading import load_any_dataset

    train = load_any_dataset(opts.dataset, None, "train").select(range(opts.train_prompts))
    held = load_any_dataset(opts.dataset, None, "test").select(range(opts.eval_prompts))
    overlap = {json.dumps(p) for p in train["prompt"]} & {json.dumps(p) for p in held["prompt"]}
    if overlap:
        raise SystemExit(f"{len(overlap)} held-out prompts are also training prompts: {sorted(overlap)[:1]}")
    return train, held


def sample_ids(model, tok, rows: list[dict], max_new_tokens: int, seed: int, batch: int,
               generation_kwargs: dict | None = None) -> list[list[int]]:
    """One completion per row (token ids, EOS included when reached); T = 1 from the full distribution."""
    from posttrain.evaluation import answer_batches

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    out: list[list[int]] = [[] for _ in rows]
    try:
        for part in answer_batches(model.eval(), tok, rows, 1, max_new_tokens, generation_kwargs or SAMPLING, batch):
            for index, ids in zip(part["index"], part["completion_ids"]):
                out[index] = ids
    finally:
        torch.set_rng_state(state)
    return out


def teacher_samples(teacher, tok, train, held, opts) -> dict:
    """The teacher's samples for the training and held-out prompts, cached in the run directory."""
    key = {k: getattr(opts, k) for k in ("teacher", "dataset", "train_prompts", "eval_prompts", "max_new_tokens")}
    path = os.path.join(opts.run_dir, "teacher-samples.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached
    start, cpu = time.time(), time.process_time()
    held_ids = sample_ids(teacher, tok, list(held), opts.max_new_tokens, seed=1, batch=opts.eval_batch)
    train_ids = sample_ids(teacher, tok, list(train), opts.max_new_tokens, seed=0, batch=opts.eval_batch)
    cached = {"key": key, "train": tok.batch_decode(train_ids, skip_special_tokens=True), "held_ids": held_ids,
              "seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
              "train_mean_tokens": sum(map(len, train_ids)) / len(train_ids)}
    with open(path, "w") as f:
        json.dump(cached, f)
    return cached


# ---- held-out divergences and accuracy -----------------------------------------------------------------------------

def _completion_rows(model, batch):
    """What gives the logits of every completion token (row-major over the batch): (final hidden rows, LM head), or
    (logits, None) for a model whose logits are not head(hidden)."""
    from posttrain.models.logprobs import forward_target_rows

    hidden, head, logits, _, valid, _ = forward_target_rows(model, batch["input_ids"], batch["labels"],
                                                            batch["attention_mask"], batch["position_ids"])
    return (hidden, head) if head is not None else (logits, None)


@torch.no_grad()
def divergences(student, teacher, tok, prompt_ids, completion_ids, batch_size: int, teacher_cache: list | None = None):
    """Per completion token, exact over the vocabulary: forward KL(teacher ‖ student) and reverse KL(student ‖ teacher),
    as means over tokens and over sequences (sums per sequence). `teacher_cache` (a list, filled on first use) keeps
    the teacher's final hidden states for the same completions (its logits are fixed across snapshots)."""
    from posttrain.evaluation import _rows_batch
    from posttrain.losses.distill import divergence_from_logps

    sums = {"fkl": 0.0, "rkl": 0.0}
    tokens = 0
    for n, start in enumerate(range(0, len(prompt_ids), batch_size)):
        completions = [c if c else [tok.eos_token_id] for c in completion_ids[start:start + batch_size]]
        batch = _rows_batch(prompt_ids[start:start + batch_size], completions, tok.pad_token_id)
        s_src, s_head = _completion_rows(student, batch)
        if teacher_cache is not None and n < len(teacher_cache):
            t_src, t_head = teacher_cache[n]
        else:
            t_src, t_head = _completion_rows(teacher, batch)
            if teacher_cache is not None:
                teacher_cache.append((t_src, t_head))
        for lo in range(0, s_src.shape[0], 256):
            s = s_src[lo:lo + 256] if s_head is None else s_head(s_src[lo:lo + 256])
            t = t_src[lo:lo + 256] if t_head is None else t_head(t_src[lo:lo + 256])
            s_logps, t_logps = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
            for name, beta in (("fkl", 0.0), ("rkl", 1.0)):
                d = divergence_from_logps(s_logps, t_logps, beta).double()
                sums[name] += d.sum().item()
        tokens += s_src.shape[0]
    n_seq = len(prompt_ids)
    out = {name: sums[name] / tokens for name in sums}
    out.update({f"{name}_per_sequence": sums[name] / n_seq for name in sums})
    out["tokens_per_sequence"] = tokens / n_seq
    return out


@torch.no_grad()
def evaluate(student, teacher, tok, held, held_prompt_ids, teacher_held_ids, teacher_cache, opts) -> dict:
    """One curve point: divergences on the student's own samples and on the teacher's, and greedy accuracy."""
    from posttrain.evaluation import generation_accuracy

    start = time.time()
    student.eval()
    own = sample_ids(student, tok, list(held), opts.max_new_tokens, seed=2, batch=opts.eval_batch)
    on_student = divergences(student, teacher, tok, held_prompt_ids, own, opts.eval_batch)
    on_teacher = divergences(student, teacher, tok, held_prompt_ids, teacher_held_ids, opts.eval_batch,
                             teacher_cache)
    acc = generation_accuracy(student, tok, held, max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch)
    return {"rkl_student_samples": on_student["rkl"], "fkl_student_samples": on_student["fkl"],
            "rkl_student_samples_per_sequence": on_student["rkl_per_sequence"],
            "student_sample_tokens": on_student["tokens_per_sequence"],
            "fkl_teacher_samples": on_teacher["fkl"], "rkl_teacher_samples": on_teacher["rkl"],
            "fkl_teacher_samples_per_sequence": on_teacher["fkl_per_sequence"],
            "accuracy": acc["accuracy"], "greedy_tokens": acc["mean_length"],
            "eval_seconds": round(time.time() - start)}


# ---- training ------------------------------------------------------------------------------------------------------

def train(method: str, student_dir: str, teacher_dir: str, train, samples: list[str], opts) -> None:
    """Train one method for opts.seconds of training CPU time; writes snapshots to the run directory."""
    import transformers

    import posttrain

    snap_dir = os.path.join(opts.run_dir, "snapshots")
    os.makedirs(snap_dir, exist_ok=True)

    class Budget(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.wall, self.paused, self.next, self.index = time.process_time(), time.time(), 0.0, 0.0, 0
            self.next = opts.snapshot

        def on_step_end(self, args, state, control, model=None, **kwargs):
            used = time.process_time() - self.start - self.paused
            if used >= self.next or used >= opts.seconds:
                t = time.process_time()
                self.index += 1
                name = os.path.join(snap_dir, f"{method}-{self.index:02d}")
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, name + ".tmp")
                os.replace(name + ".tmp", name + ".pt")
                meta = {"method": method, "index": self.index, "seconds": round(used, 1), "steps": state.global_step,
                        "wall_seconds": round(time.time() - self.wall, 1),
                        "final": used >= opts.seconds}
                with open(name + ".json", "w") as f:
                    json.dump(meta, f)
                print(f"{method}: snapshot {self.index} at {used:.0f} CPU s, step {state.global_step}", flush=True)
                self.paused += time.process_time() - t
                while self.next <= used:
                    self.next += opts.snapshot
            if used >= opts.seconds:
                control.should_training_stop = True

    common = dict(output_dir=os.path.join(opts.run_dir, f"run-{method}"), max_steps=100000,
                  per_device_train_batch_size=opts.batch, learning_rate=opts.lr, lr_scheduler_type="constant",
                  logging_steps=5, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    with_completions = train.add_column("completion", [[{"role": "assistant", "content": c}] for c in samples])
    with_completions = with_completions.select_columns(["prompt", "completion"])
    if method == "sft":
        trainer = posttrain.SFTTrainer(student_dir, args=posttrain.SFTConfig(max_length=512, **common),
                                       train_dataset=with_completions, callbacks=[Budget()])
    elif method == "on-policy":
        trainer = posttrain.DistillationTrainer(
            student_dir, teacher_model=teacher_dir, train_dataset=train.select_columns(["prompt"]),
            callbacks=[Budget()], args=posttrain.DistillationConfig(
                beta=1.0, temperature=1.0, max_completion_length=opts.max_new_tokens, **common))
    elif method == "gkd":
        trainer = posttrain.GKDTrainer(
            student_dir, teacher_model=teacher_dir, train_dataset=with_completions, callbacks=[Budget()],
            args=posttrain.GKDConfig(beta=0.5, lmbda=0.5, temperature=1.0, max_completion_length=opts.max_new_tokens,
                                     **common))
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    trainer.train()
    with open(os.path.join(opts.run_dir, f"log-{method}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)


# ---- phases --------------------------------------------------------------------------------------------------------

def setup(opts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = student_from_teacher(opts.teacher, opts.student_layers, opts.student_init)
    tok = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    opts.layers_kept = student_layer_indices(teacher.config.num_hidden_layers, opts.student_layers,
                                             opts.student_init)
    train_rows, held = load_prompts(opts)
    samples = teacher_samples(teacher, tok, train_rows, held, opts)
    return teacher_dir, student_dir, tok, teacher, train_rows, held, samples


def phase_train(opts) -> None:
    with open(os.path.join(opts.run_dir, "train-command.txt"), "w") as f:
        f.write(opts.command + "\n")
    teacher_dir, student_dir, tok, teacher, train_rows, held, samples = setup(opts)
    del teacher
    print(f"teacher samples: {samples['cpu_seconds']} CPU s; training {', '.join(opts.methods)}", flush=True)
    for method in opts.methods:
        if glob.glob(os.path.join(opts.run_dir, "snapshots", f"{method}-*.json")):
            print(f"{method}: snapshots exist in {opts.run_dir}, skipped", flush=True)
            continue
        train(method, student_dir, teacher_dir, train_rows, samples["train"], opts)
    with open(os.path.join(opts.run_dir, "train-done"), "w") as f:
        f.write("done\n")


def phase_eval(opts, wait: bool, score: bool = True) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.data.tokenize import tokenize_prompt
    from posttrain.evaluation import generation_accuracy

    teacher_dir, student_dir, tok, teacher, train_rows, held, samples = setup(opts)
    held_prompt_ids = [tokenize_prompt(tok, p) for p in held["prompt"]]
    teacher_cache: list = []
    result_path = os.path.join(opts.run_dir, "eval.json")
    key = {k: getattr(opts, k) for k in ("teacher", "student_layers", "student_init", "dataset", "eval_prompts",
                                         "max_new_tokens")}
    result = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    if result.get("key") != key:
        result = {"key": key, "points": {}}

    def save():
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(result_path + ".tmp", result_path)

    if "teacher" not in result:
        acc = generation_accuracy(teacher, tok, held, max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch)
        result["teacher"] = {"accuracy": acc["accuracy"], "greedy_tokens": acc["mean_length"],
                             "sample_tokens": sum(map(len, samples["held_ids"])) / len(samples["held_ids"])}
        save()
    base = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    if "initial" not in result:
        result["initial"] = evaluate(base, teacher, tok, held, held_prompt_ids, samples["held_ids"], teacher_cache,
                                     opts)
        print("initial student", json.dumps(result["initial"]), flush=True)
        save()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    snap_dir = os.path.join(opts.run_dir, "snapshots")
    while True:  # several eval processes may share the work: each snapshot is claimed by one (an exclusive file)
        worked = False
        metas = sorted(glob.glob(os.path.join(snap_dir, "*-[0-9][0-9].json")), key=_eval_order)
        for meta_path in metas:
            name = os.path.basename(meta_path)[:-5]
            done_path = os.path.join(snap_dir, f"{name}.result")
            if name in result["points"]:
                continue
            if os.path.exists(done_path):
                with open(done_path) as f:
                    result["points"][name] = json.load(f)
                continue
            if not score:
                continue
            try:
                os.close(os.open(os.path.join(snap_dir, f"{name}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            with open(meta_path) as f:
                meta = json.load(f)
            state = torch.load(meta_path[:-5] + ".pt")
            base.load_state_dict(reference)
            keys = base.load_state_dict(state, strict=False)
            assert set(keys.missing_keys) <= {"lm_head.weight"} and not keys.unexpected_keys, keys
            point = {**meta, **evaluate(base, teacher, tok, held, held_prompt_ids, samples["held_ids"],
                                        teacher_cache, opts)}
            with open(done_path + ".tmp", "w") as f:
                json.dump(point, f)
            os.replace(done_path + ".tmp", done_path)
            result["points"][name] = point
            print(json.dumps(point), flush=True)
            save()
            worked = True
            if not meta["final"] and not opts.keep_snapshots:
                os.remove(meta_path[:-5] + ".pt")
        if worked:
            continue
        finished = all(os.path.basename(m)[:-5] in result["points"] for m in metas) or not score
        if finished and (not wait or os.path.exists(os.path.join(opts.run_dir, "train-done"))):
            break
        time.sleep(15)
    write_output(opts, result, samples)


def _eval_order(meta_path: str) -> tuple:
    """Final snapshots first, then every other one, then the rest: if scoring falls behind training, the curves lose
    intermediate points, not their ends."""
    with open(meta_path) as f:
        meta = json.load(f)
    return (not meta["final"], meta["index"] % 2, meta["index"], meta_path)


def write_output(opts, result: dict, samples: dict) -> None:
    logs = {}
    for method in opts.methods:
        path = os.path.join(opts.run_dir, f"log-{method}.json")
        if os.path.exists(path):
            with open(path) as f:
                logs[method] = [{k: v for k, v in row.items() if k in ("step", "loss")} for row in json.load(f)
                                if "loss" in row]
    curves = {m: [{"seconds": 0.0, "steps": 0, **result["initial"]}]
              + sorted((p for p in result["points"].values() if p["method"] == m), key=lambda p: p["index"])
              for m in opts.methods}
    train_command = None
    if os.path.exists(os.path.join(opts.run_dir, "train-command.txt")):
        with open(os.path.join(opts.run_dir, "train-command.txt")) as f:
            train_command = f.read().strip()
    out = {"train_command": train_command, "eval_command": opts.command,
           "options": {k: v for k, v in vars(opts).items() if k != "command"},
           "teacher_sampling": {k: samples[k] for k in ("seconds", "cpu_seconds", "train_mean_tokens")},
           "teacher": result["teacher"], "initial_student": result["initial"], "curves": curves, "train_loss": logs}
    with open(opts.out, "w") as f:
        json.dump(out, f, indent=1)
    print(tables(out))
    print("run reports:", ", ".join(write_run_reports(opts, out)))


HELD_OUT_KEYS = ("rkl_student_samples", "fkl_teacher_samples", "fkl_student_samples", "accuracy")


def write_run_reports(opts, out: dict) -> list[str]:
    """Each method's run report (run_dir/run-METHOD/report.html) rewritten with the held-out curves beside the
    training metrics: the trainer's log rows plus one `eval_*` row per snapshot (x axis: optimizer step)."""
    import yaml

    from posttrain.reporting import html, plots, summary
    from posttrain.reporting.atomic import write_text

    paths = []
    for method, curve in out["curves"].items():
        run_dir = os.path.join(opts.run_dir, f"run-{method}")
        log_path = os.path.join(opts.run_dir, f"log-{method}.json")
        if not os.path.isdir(run_dir) or not os.path.exists(log_path):
            continue
        with open(log_path) as f:
            rows = json.load(f)
        rows += [{"step": p["steps"], **{f"eval_{k}": p[k] for k in HELD_OUT_KEYS}} for p in curve]
        config = {}
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            with open(os.path.join(run_dir, "config.yaml")) as f:
                config = {k: v for k, v in (yaml.safe_load(f) or {}).items() if not isinstance(v, (dict, list))}
        last = curve[-1]
        facts = {"demo": opts.command, "method": method, "training CPU seconds": last["seconds"],
                 "steps": last["steps"], "held-out prompts": opts.eval_prompts,
                 "held-out metrics": "eval_rkl_student_samples = reverse KL(student ‖ teacher) per token on the "
                                     "student's own samples; eval_fkl_teacher_samples = forward KL(teacher ‖ student) "
                                     "per token on the teacher's samples; eval_accuracy = greedy accuracy_reward"}
        note = None if plots.matplotlib_available() else "matplotlib is not installed (pip install 'posttrain[plots]')."
        page = html.run_page(f"posttrain distillation demo — {method}", facts, summary.summarise(rows),
                             plots.render(summary.series(rows), run_dir), config, plots_note=note)
        paths.append(write_text(os.path.join(run_dir, "report.html"), page))
    return paths


def tables(out: dict) -> str:
    lines = ["| method | steps | train CPU s | reverse KL, student samples | forward KL, teacher samples | "
             "forward KL, student samples | accuracy |", "|---|---|---|---|---|---|---|"]
    init = out["initial_student"]

    def row(name, p):
        return (f"| {name} | {p['steps']} | {p['seconds']:.0f} | {p['rkl_student_samples']:.3f} | "
                f"{p['fkl_teacher_samples']:.3f} | {p['fkl_student_samples']:.3f} | {p['accuracy']:.3f} |")

    lines.append(row("initial student", {"steps": 0, "seconds": 0, **init}))
    for method, curve in out["curves"].items():
        lines.append(row(method, curve[-1]))
    lines.append(f"| teacher | | | 0 | 0 | 0 | {out['teacher']['accuracy']:.3f} |")
    lines += ["", "Curves (held-out; each row one snapshot):", "",
              "| method | train CPU s | steps | reverse KL, student samples | forward KL, teacher samples | "
              "accuracy | student sample tokens |", "|---|---|---|---|---|---|---|"]
    for method, curve in out["curves"].items():
        for p in curve:
            lines.append(f"| {method} | {p['seconds']:.0f} | {p['steps']} | {p['rkl_student_samples']:.3f} | "
                         f"{p['fkl_teacher_samples']:.3f} | {p['accuracy']:.3f} | {p['student_sample_tokens']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("all", "samples", "train", "eval", "report", "table"), default="all",
                        help="report: write the JSON, tables and run reports from the snapshots scored so far.")
    parser.add_argument("--teacher", default="posttrain/smollm2-135m-instruct")
    parser.add_argument("--student_layers", type=int, default=6)
    parser.add_argument("--student_init", choices=("ends", "spread", "first"), default="ends",
                        help="Which teacher layers the student keeps: the first and last ones (ends), evenly spread "
                             "from the first to the last, or the first ones (distill_compare.student_layer_indices).")
    parser.add_argument("--dataset", default="posttrain/wordmath-prompts")
    parser.add_argument("--seconds", type=float, default=900, help="Training time (CPU seconds) per method.")
    parser.add_argument("--snapshot", type=float, default=225, help="Seconds of training between held-out scores.")
    parser.add_argument("--train_prompts", type=int, default=1000)
    parser.add_argument("--eval_prompts", type=int, default=128)
    parser.add_argument("--eval_batch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="Prompts (= completions) per optimizer step.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--run_dir", default="/tmp/posttrain-distill-demo")
    parser.add_argument("--keep_snapshots", action="store_true", help="Keep every snapshot (default: the last).")
    parser.add_argument("--out", default=os.path.join(HERE, "DISTILLATION-demo.json"))
    opts = parser.parse_args()
    opts.command = "python benchmarks/distill_demo.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(1)  # the training-time budget counts this process's CPU time
    if opts.phase == "table":
        with open(opts.out) as f:
            print(tables(json.load(f)))
        return
    os.makedirs(opts.run_dir, exist_ok=True)
    if opts.phase == "samples":  # the teacher's samples alone (cached in run_dir for the other phases)
        print(json.dumps({k: v for k, v in setup(opts)[-1].items() if k not in ("train", "held_ids")}))
        return
    if opts.phase in ("all", "train"):
        phase_train(opts)
    if opts.phase in ("all", "eval", "report"):
        phase_eval(opts, wait=opts.phase == "eval", score=opts.phase != "report")


if __name__ == "__main__":
    main()
