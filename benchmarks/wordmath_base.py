"""The starting point of the SmolLM2 recipes (issue 22): how the built-in SmolLM2-135M-Instruct does on the
held-out `posttrain/wordmath` questions before any training, greedy and sampled at T=1.

Two scores per completion: strict (`accuracy_reward`: the `#### N` line the prompt asks for, or \\boxed{N}) and
lenient (the last number anywhere in the completion — what the model "meant" when it ignores the format).

    python benchmarks/wordmath_base.py --num_prompts 1000 --out benchmarks/wordmath-base.json
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from posttrain.data.loading import load_any_dataset
from posttrain.evaluation import decoding_dtype, generation_accuracy
from posttrain.models import loading

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def lenient_reward(completions, answer, **kwargs):
    """1.0 when the last number in the completion equals the answer (format ignored)."""
    out = []
    for completion, gold in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = _NUMBER.findall(text)
        out.append(float(bool(found) and found[-1].replace(",", "").rstrip(".") == str(gold)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="posttrain/smollm2-135m-instruct")
    p.add_argument("--num_prompts", type=int, default=1000)
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--out", default=None)
    p.add_argument("--greedy_only", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="decode in bf16 (a bf16 copy of the model; native-bf16 hardware only)")
    p.add_argument("--drift_dir", default=None,
                   help="also KL(instruct model ‖ this model) on 200 posttrain/chat-prompts (the pipeline's drift "
                        "check); the instruct model's samples are made once and kept in DIR/drift-reference.json")
    p.add_argument("--versus", default=None, help="an earlier --out JSON (same questions): fixed / broken / exact "
                                                  "McNemar p of the greedy strict scores, question by question")
    args = p.parse_args()
    torch.manual_seed(0)
    model = loading.load_pretrained_model(args.model)
    tokenizer = loading.load_tokenizer(args.model)
    loading.prepare_tokenizer(tokenizer)
    test = load_any_dataset("posttrain/wordmath-prompts", None, "test").select(range(args.num_prompts))
    from posttrain.rewards.builtin import accuracy_reward, format_reward

    result = {"model": args.model, "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
              "dtype": args.dtype}
    modes = (("greedy", 0.0),) if args.greedy_only else (("greedy", 0.0), ("sampled_T1", 1.0))
    if args.num_prompts == 0:  # --num_prompts 0 --drift_dir DIR: the drift check alone
        modes = ()
    for mode, temperature in modes:
        start = time.time()
        side: dict[str, list[float]] = {"lenient": [], "format": []}

        def scored(completions, answer, **kwargs):  # one generation, three scores
            side["lenient"] += lenient_reward(completions, answer)
            side["format"] += format_reward(completions)
            return accuracy_reward(completions, answer=answer, **kwargs)

        run = generation_accuracy(model, tokenizer, test, reward_func=scored, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, temperature=temperature,
                                  dtype=decoding_dtype(args.dtype))
        by_steps = {}
        for row, s in zip(test, side["lenient"]):
            by_steps.setdefault(row["steps"], []).append(s)
        result[mode] = {"strict": round(run["accuracy"], 4),
                        **{k: round(sum(v) / len(v), 4) for k, v in side.items()},
                        "mean_length": round(run["mean_length"], 1),
                        "lenient_by_steps": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_steps.items())},
                        "strict_correct": "".join("1" if x else "0" for x in run["scores"]),
                        "lenient_correct": "".join("1" if x else "0" for x in side["lenient"])}
        result[mode]["examples"] = [list(map(str, e)) for e in run["examples"]]
        result[mode]["seconds"] = round(time.time() - start, 1)
        print(mode, json.dumps({k: v for k, v in result[mode].items() if not k.endswith(("examples", "correct"))}),
              flush=True)
    if args.drift_dir:
        from types import SimpleNamespace

        from posttrain.pipeline.run import drift_reference, measure_drift

        where = SimpleNamespace(output_dir=args.drift_dir, evaluation={
            "drift_dataset": "posttrain/chat-prompts", "drift_split": "test", "drift_prompts": 200,
            "drift_max_new_tokens": 64})
        start = time.time()
        drift = measure_drift(model, tokenizer, drift_reference(where, "posttrain/smollm2-135m-instruct"))
        result["drift"] = {**drift, "seconds": round(time.time() - start, 1)}
        print("drift", json.dumps({k: v for k, v in result["drift"].items() if k != "chat_examples"}), flush=True)
    if args.versus:
        from posttrain.evaluation import paired_comparison

        with open(args.versus) as f:
            before = json.load(f)["greedy"]["strict_correct"]
        after = result["greedy"]["strict_correct"]
        if len(before) != len(after):
            raise SystemExit(f"--versus {args.versus} scored {len(before)} questions, this run {len(after)}")
        result["versus"] = {"file": args.versus, **paired_comparison([c == "1" for c in before],
                                                                       [c == "1" for c in after])}
        print("versus", json.dumps(result["versus"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
