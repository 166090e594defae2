"""Distillation demo with a real teacher: on-policy distillation vs SFT on the teacher's samples vs GKD, at equal
training time, measured by the held-out KL to the teacher (and the task accuracy of the final students).

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/distill_demo.py --seconds 240 --train_prompts 160 \
        --out benchmarks/DISTILLATION-demo.json

Teacher: the built-in SmolLM2-135M-Instruct (`posttrain/smollm2-135m-instruct`, 30 layers). Student: the teacher's
embeddings, first `--student_layers` layers, final norm and head (`distill_compare.student_from_teacher`: the same
tokenizer by construction). Task: the built-in arithmetic word problems as chat prompts. Steps:
1. the teacher samples one completion (temperature 1, ≤ `--max_new_tokens`) for every training and held-out prompt;
2. each method trains a fresh copy of the student for `--seconds` of training time (a callback stops the run),
   snapshots of the student are kept every `--snapshot` seconds (the clock paused while copying). Time is the
   process's CPU time (run with one thread: `OMP_NUM_THREADS=1`), which equals wall-clock on an idle core and is
   not inflated by other processes on a shared one;
     on-policy    DistillationTrainer, β = 0.5 (JSD), the student samples its own completions;
     sft          SFTTrainer on the teacher's samples (sequence-level KD, off-policy);
     gkd          GKDTrainer, λ = 0.5, β = 0.5: half the batches on-policy, half the teacher's samples;
3. every snapshot is scored on the held-out prompts with the teacher's samples, teacher-forced: the mean per-token
   forward KL(teacher ‖ student) and the JSD (β = 0.5) over the completion tokens; the final students (and the
   teacher) also answer the held-out prompts greedily, scored by `accuracy_reward`.
Same learning rate, batch (prompts per step) and completion length for all three. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_compare import student_from_teacher  # noqa: E402

TEACHER = "posttrain/smollm2-135m-instruct"


def teacher_samples(teacher, tok, prompts, max_new_tokens: int, seed: int) -> list[str]:
    from posttrain.data.tokenize import tokenize_prompt
    from posttrain.rollout.hf import generate

    out = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), 16):
        ids = [tokenize_prompt(tok, p) for p in prompts[start:start + 16]]
        rollout = generate(teacher, tok, ids, 1, max_new_tokens, {"do_sample": True, "temperature": 1.0, "top_k": 0})
        for row, mask in zip(rollout.completion_ids, rollout.completion_mask):
            out.append(tok.decode(row[mask.bool()], skip_special_tokens=True))
    return out


@torch.no_grad()
def held_out_divergence(student, teacher, tok, rows) -> dict:
    """Mean per-token KL(teacher ‖ student) and JSD(0.5) over the teacher's completions of the held-out prompts."""
    from posttrain.data.tokenize import tokenize_prompt_and_completions
    from posttrain.losses.distill import generalized_jsd

    kl, jsd, n = 0.0, 0.0, 0
    for row in rows:
        prompt, (completion,) = tokenize_prompt_and_completions(tok, row["prompt"], [row["completion"]],
                                                                tok.eos_token)
        ids = torch.tensor([prompt + completion])
        span = slice(len(prompt) - 1, ids.shape[1] - 1)
        s, t = student(ids).logits[0, span], teacher(ids).logits[0, span]
        kl += generalized_jsd(s, t, 0.0).sum().item()
        jsd += generalized_jsd(s, t, 0.5).sum().item()
        n += len(completion)
    return {"kl": kl / n, "jsd": jsd / n, "tokens": n}


@torch.no_grad()
def accuracy(model, tok, rows, max_new_tokens: int) -> float:
    from posttrain.data.tokenize import tokenize_prompt
    from posttrain.rewards.builtin import accuracy_reward
    from posttrain.rollout.hf import generate

    ids = [tokenize_prompt(tok, r["prompt"]) for r in rows]
    rollout = generate(model, tok, ids, 1, max_new_tokens, {"do_sample": False})
    texts = [tok.decode(c[m.bool()], skip_special_tokens=True)
             for c, m in zip(rollout.completion_ids, rollout.completion_mask)]
    scores = accuracy_reward(texts, answer=[r["answer"] for r in rows])
    return sum(s or 0.0 for s in scores) / len(rows)


def train(method: str, student_dir: str, teacher_dir: str, prompts, samples, opts) -> list[dict]:
    """Train one method for opts.seconds of training time; snapshots [(seconds, steps, state_dict)]."""
    import transformers

    import posttrain

    snapshots: list[dict] = []

    class Budget(transformers.TrainerCallback):
        def __init__(self):
            self.used, self.next_snapshot = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.process_time()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.used += time.process_time() - self.t
            if self.used >= self.next_snapshot or self.used >= opts.seconds:
                snapshots.append({"seconds": round(self.used, 1), "steps": state.global_step,
                                  "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
                self.next_snapshot += opts.snapshot
            if self.used >= opts.seconds:
                control.should_training_stop = True

    common = dict(output_dir=f"/tmp/distill-demo-{method}", max_steps=100000, per_device_train_batch_size=opts.batch,
                  learning_rate=opts.lr, lr_scheduler_type="constant", logging_steps=5, report_to="none",
                  save_strategy="no", seed=0, disable_tqdm=True, overwrite_output_dir=True)
    budget = Budget()
    snapshots.append({"seconds": 0.0, "steps": 0, "state": None})
    if method == "sft":
        data = prompts.add_column("completion", [[{"role": "assistant", "content": c}] for c in samples])
        trainer = posttrain.SFTTrainer(student_dir, args=posttrain.SFTConfig(max_length=512, **common),
                                       train_dataset=data.select_columns(["prompt", "completion"]),
                                       callbacks=[budget])
    elif method == "on-policy":
        trainer = posttrain.DistillationTrainer(
            student_dir, teacher_model=teacher_dir, train_dataset=prompts.select_columns(["prompt"]),
            callbacks=[budget], args=posttrain.DistillationConfig(beta=0.5, max_completion_length=opts.max_new_tokens,
                                                                  **common))
    else:
        data = prompts.add_column("completion", [[{"role": "assistant", "content": c}] for c in samples])
        trainer = posttrain.GKDTrainer(
            student_dir, teacher_model=teacher_dir, train_dataset=data.select_columns(["prompt", "completion"]),
            callbacks=[budget], args=posttrain.GKDConfig(beta=0.5, lmbda=0.5, temperature=1.0,
                                                         max_completion_length=opts.max_new_tokens, **common))
    trainer.train()
    return snapshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student_layers", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=240, help="Training time (CPU seconds) per method.")
    parser.add_argument("--snapshot", type=float, default=60)
    parser.add_argument("--train_prompts", type=int, default=256)
    parser.add_argument("--eval_prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=["on-policy", "sft", "gkd"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "DISTILLATION-demo.json"))
    opts = parser.parse_args()
    torch.set_num_threads(1)  # the training-time budget counts this process's CPU time
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.arith import load_builtin_dataset

    teacher_dir, student_dir = student_from_teacher(TEACHER, opts.student_layers)
    tok = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompts = load_builtin_dataset("posttrain/arith-prompts", "conversational", split=f"train[:{opts.train_prompts}]")
    held = load_builtin_dataset("posttrain/arith-prompts", "conversational", split=f"test[:{opts.eval_prompts}]")
    start = time.time()
    cache = f"/tmp/posttrain-distill-demo-samples-{opts.train_prompts}-{opts.eval_prompts}-{opts.max_new_tokens}.json"
    if os.path.exists(cache):  # the teacher's samples of an earlier run with the same prompts and length
        with open(cache) as f:
            samples, held_samples = json.load(f)
    else:
        samples = teacher_samples(teacher, tok, prompts["prompt"], opts.max_new_tokens, seed=0)
        held_samples = teacher_samples(teacher, tok, held["prompt"], opts.max_new_tokens, seed=1)
        with open(cache, "w") as f:
            json.dump([samples, held_samples], f)
    held_rows = [{"prompt": p, "completion": [{"role": "assistant", "content": c}], "answer": a}
                 for p, c, a in zip(held["prompt"], held_samples, held["answer"])]
    print(f"teacher samples: {len(samples) + len(held_samples)} in {time.time() - start:.0f} s", flush=True)
    result = {"command": "python benchmarks/distill_demo.py " + " ".join(sys.argv[1:]), "options": vars(opts),
              "teacher_accuracy": accuracy(teacher, tok, held_rows, opts.max_new_tokens), "methods": {}}
    base = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    result["initial_student"] = held_out_divergence(base, teacher, tok, held_rows)
    result["initial_student"]["accuracy"] = accuracy(base, tok, held_rows, opts.max_new_tokens)
    print(f"teacher accuracy {result['teacher_accuracy']:.2f}; initial student {result['initial_student']}",
          flush=True)
    for method in opts.methods:
        snapshots = train(method, student_dir, teacher_dir, prompts, samples, opts)
        curve = []
        for snap in snapshots:
            model = copy.deepcopy(base)
            if snap["state"] is not None:
                missing = model.load_state_dict(snap["state"], strict=False).missing_keys
                assert set(missing) <= {"lm_head.weight"}, missing  # a tied head is not in every state dict
            point = {"seconds": snap["seconds"], "steps": snap["steps"],
                     **held_out_divergence(model.eval(), teacher, tok, held_rows)}
            curve.append(point)
        point["accuracy"] = accuracy(model, tok, held_rows, opts.max_new_tokens)
        result["methods"][method] = curve
        print(method, json.dumps(curve), flush=True)
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\n| method | steps | train s | held-out KL(teacher ‖ student) | held-out JSD | accuracy |")
    print("|---|---|---|---|---|---|")
    init = result["initial_student"]
    print(f"| initial student | 0 | 0 | {init['kl']:.3f} | {init['jsd']:.4f} | {init['accuracy']:.2f} |")
    for method, curve in result["methods"].items():
        last = curve[-1]
        print(f"| {method} | {last['steps']} | {last['seconds']:.0f} | {last['kl']:.3f} | {last['jsd']:.4f} | "
              f"{last.get('accuracy', float('nan')):.2f} |")
    print(f"| teacher | | | 0 | 0 | {result['teacher_accuracy']:.2f} |")


if __name__ == "__main__":
    main()
