"""Why tools matter, on the built-in arithmetic task: a calculator tool against the same budget without it.

Stage `tiny` (issue 24, demo a), all offline on a CPU, from the random-init built-in model (posttrain/tiny-4m):
  1. SFT on tool-use traces (user question → assistant calls calculator("a op b") → tool result → "#### N",
     assistant-only loss, so the tool result is never trained) and, with the same steps, on the plain worked
     solutions (arith-sft, conversational);
  2. GRPO from each, the same steps and options, with `tools=[calculator]` for the tool model;
  3. held-out greedy accuracy on the 1,000 test questions after each stage (tool model: up to 3 tool rounds),
     paired tests (posttrain.evaluation.paired_comparison), tool-call rate, speed of each GRPO run.
Stage `smollm` (demo b): SmolLM2-135M-Instruct with the ChatML tool template, GRPO with the calculator from the
instruct model; tool-call rate and held-out accuracy before / after.
Stage `smollm-sft` (demo b, the version that can learn: the instruct model never calls a tool by itself): the word
problems (posttrain/wordmath-*) — SFT on tool-use traces (one calculator call per solution step, its result a `tool`
turn, then `#### N`) against the same SFT on the plain worked solutions, then GRPO from each with the same budget;
held-out greedy accuracy on the wordmath test questions after each stage, paired tests, tool-call rates.

    python benchmarks/agentic_demo.py --stage tiny [--sft_steps 300 --grpo_steps 60]
    python benchmarks/agentic_demo.py --stage smollm [--grpo_steps 30 --eval_rows 200]
    python benchmarks/agentic_demo.py --stage smollm-sft [--sft_steps 30 --grpo_steps 20 --eval_rows 300]

Prints markdown rows for benchmarks/AGENTIC.md and writes outputs/agentic/<stage>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))  # the calculator tool is the example's (examples/agentic_tools.py)

import datasets  # noqa: E402
import torch  # noqa: E402

from posttrain.data.arith import extract_answer, load_builtin_dataset  # noqa: E402
from posttrain.evaluation import paired_comparison  # noqa: E402
from posttrain.models.loading import load_pretrained_model, load_tokenizer, prepare_tokenizer  # noqa: E402
from posttrain.rollout.agentic import AgentLoop  # noqa: E402
from posttrain.rollout.hf import generate  # noqa: E402

from agentic_tools import calculator  # noqa: E402

OUT = "outputs/agentic"
TEMPLATE = "posttrain/chatml-tools"


def tool_traces(split: str) -> datasets.Dataset:
    """arith-sft conversations rewritten as tool use: the assistant calls the calculator, then answers."""
    from posttrain.rollout.tools import tool_schemas

    schemas = tool_schemas([calculator])
    rows = []
    for row in load_builtin_dataset("posttrain/arith-sft", "conversational", split=split):
        solution = row["completion"][0]["content"]
        expression, answer = solution.split(" = ")[0], solution.rsplit("#### ", 1)[1].strip()
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        rows.append({"messages": row["prompt"] + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": calculator(expression)},
            {"role": "assistant", "content": f"#### {answer}"}], "tools": schemas})
    return datasets.Dataset.from_list(rows)


def wordmath_tool_traces(rows: int) -> datasets.Dataset:
    """wordmath-sft rows as tool use: one calculator call per solution line `a op b = c`, its result as a tool turn,
    then the `#### N` answer (messages + tools columns)."""
    from posttrain.rollout.tools import tool_schemas

    schemas = tool_schemas([calculator])
    out = []
    for row in load_builtin_dataset("posttrain/wordmath-sft", split=f"train[:{rows}]"):
        messages = list(row["prompt"])
        *lines, final = row["completion"][0]["content"].split("\n")
        for line in lines:
            expression = line.split(" = ")[0]
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "calculator", "content": calculator(expression)}]
        messages.append({"role": "assistant", "content": final})
        out.append({"messages": messages, "tools": schemas})
    return datasets.Dataset.from_list(out)


def prompt_split(dataset: str, split: str) -> datasets.Dataset:
    """A split of the arithmetic (conversational config) or word-problem prompts: prompt messages + answer."""
    return load_builtin_dataset(dataset, "conversational" if dataset == "posttrain/arith-prompts" else None, split=split)


def held_out(rows: int, dataset: str = "posttrain/arith-prompts") -> datasets.Dataset:
    return prompt_split(dataset, f"test[:{rows}]")


@torch.no_grad()
def accuracy(model_path: str, tools: bool, rows: int, batch: int = 100, max_new: int = 64,
             dataset: str = "posttrain/arith-prompts") -> dict:
    """Greedy held-out accuracy (answer after '####' in the last assistant turn) and tool-call rate."""
    model = load_pretrained_model(model_path).eval()
    tok = prepare_tokenizer(load_tokenizer(model_path), chat_template_path=TEMPLATE if tools else None)
    loop = AgentLoop(tok, [calculator] if tools else [], max_iterations=3 if tools else 0)

    def greedy(prompt_ids, per_prompt, max_new_tokens):
        r = generate(model, tok, prompt_ids, per_prompt, max_new_tokens, {"do_sample": False})
        lengths = r.completion_mask.sum(1).tolist()
        return [(ids[:n].tolist(), not t) for ids, n, t in zip(r.completion_ids, lengths, r.is_truncated.tolist())]

    data = held_out(rows, dataset)
    scores, calls = [], []
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        part = [dict(r) for r in data.select(range(i, min(i + batch, len(data))))]
        rollout = loop.run(part, greedy, max_new)
        for row, completion in zip(part, rollout.completions):
            scores.append(float(extract_answer(completion[-1]["content"]) == row["answer"]))
        calls += rollout.tool_calls.tolist()
    return {"accuracy": sum(scores) / len(scores), "scores": scores,
            "tool_call_rate": sum(c > 0 for c in calls) / len(calls), "eval_s": time.perf_counter() - start,
            "example": rollout.completions[0]}


def sft(model: str, data: datasets.Dataset, out: str, steps: int, tools: bool, **overrides) -> float:
    from posttrain import SFTConfig, SFTTrainer

    options = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=2e-3,
                   lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.0, max_length=256, logging_steps=50,
                   save_strategy="no", report_to="none", seed=42, assistant_only_loss=True,
                   chat_template_path=TEMPLATE if tools else None)
    args = SFTConfig(**{**options, **overrides})
    start = time.perf_counter()
    trainer = SFTTrainer(model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(out)
    return time.perf_counter() - start


def grpo(model: str, out: str, steps: int, tools: bool, dataset: str = "posttrain/arith-prompts", **overrides) -> dict:
    from posttrain import GRPOConfig, GRPOTrainer

    options = dict(output_dir=out, max_steps=steps, num_generations=8, per_device_train_batch_size=64,
                   max_completion_length=64, learning_rate=3e-5, lr_scheduler_type="constant", beta=0.0,
                   epsilon_high=0.28, logging_steps=10, save_strategy="no", report_to="none", seed=42,
                   log_completions=True)
    if tools:
        options.update(chat_template_path=TEMPLATE, max_tool_calling_iterations=3)
    options.update(overrides)
    prompts = prompt_split(dataset, "train")
    trainer = GRPOTrainer(model, reward_funcs="accuracy_reward", args=GRPOConfig(**options), train_dataset=prompts,
                          tools=[calculator] if tools else None)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(out)
    logs = [r for r in trainer.state.log_history if "reward" in r]
    completions = steps * options["per_device_train_batch_size"]
    tokens = trainer.state.num_input_tokens_seen or sum(r.get("num_tokens", 0) for r in logs[-1:])
    return {"seconds": seconds, "s_per_step": seconds / steps, "completions_per_s": completions / seconds,
            "reward_first": logs[0]["reward"], "reward_last": logs[-1]["reward"], "tokens": tokens,
            "tool_calls_last": logs[-1].get("tools/call_frequency"), "turns_last": logs[-1].get("turns/mean")}


def paired(a: dict, b: dict) -> str:
    p = paired_comparison(a["scores"], b["scores"])
    return f"+{p['fixed']} / −{p['broken']} (p={p['p_value']:.2g})"


def tools_against_plain(traces: datasets.Dataset, plain: datasets.Dataset, model: str, prefix: str, args,
                        dataset: str, sft_options: dict, grpo_options: dict, eval_options: dict) -> dict:
    """SFT on the tool traces and on the plain solutions with the same steps, then GRPO from each with the same
    budget (`tools=[calculator]` for the tool model); held-out accuracy after every stage."""
    os.makedirs(OUT, exist_ok=True)
    res = {"sft_s": {}, "eval": {}, "grpo": {}}
    for name, data, tools in (("tools", traces, True), ("plain", plain, False)):
        sft_dir, grpo_dir = f"{OUT}/{prefix}sft-{name}", f"{OUT}/{prefix}grpo-{name}"
        res["sft_s"][name] = sft(model, data, sft_dir, args.sft_steps, tools, **sft_options.get(name, {}))
        res["eval"][f"sft-{name}"] = accuracy(sft_dir, tools, args.eval_rows, dataset=dataset, **eval_options)
        res["grpo"][name] = grpo(sft_dir, grpo_dir, args.grpo_steps, tools, dataset=dataset, **grpo_options)
        res["eval"][f"grpo-{name}"] = accuracy(grpo_dir, tools, args.eval_rows, dataset=dataset, **eval_options)
    return res


def tiny(args) -> dict:
    plain = load_builtin_dataset("posttrain/arith-sft", "conversational", split="train")
    plain = plain.map(lambda r: {"messages": r["prompt"] + r["completion"]}, remove_columns=plain.column_names)
    return tools_against_plain(tool_traces("train"), plain, args.model, "", args, "posttrain/arith-prompts",
                               {}, {}, {})


def smollm_sft(args) -> dict:
    """Demo b on the word problems: tool-use SFT → GRPO with the calculator, against plain SFT → GRPO."""
    rows = args.sft_steps * 16
    plain = load_builtin_dataset("posttrain/wordmath-sft", split=f"train[:{rows}]").select_columns(
        ["prompt", "completion"])  # prompt-completion: loss on the answer only, as the traces' assistant-only loss
    common = dict(per_device_train_batch_size=16, learning_rate=args.sft_lr, warmup_steps=3, logging_steps=5)
    sft_options = {"tools": {**common, "max_length": 768},
                   "plain": {**common, "max_length": 256, "assistant_only_loss": False}}
    grpo_options = dict(per_device_train_batch_size=16, num_generations=8, learning_rate=args.lr,
                        max_completion_length=128, temperature=0.8, logging_steps=5)
    return tools_against_plain(wordmath_tool_traces(rows), plain, "posttrain/smollm2-135m-instruct", "smollm-",
                               args, "posttrain/wordmath-prompts", sft_options, grpo_options,
                               dict(batch=50, max_new=128))


def smollm(args) -> dict:
    model = "posttrain/smollm2-135m-instruct"
    res = {"eval": {"before": accuracy(model, True, args.eval_rows, batch=50)}}
    res["grpo"] = grpo(model, f"{OUT}/grpo-smollm", args.grpo_steps, True, per_device_train_batch_size=16,
                       num_generations=8, learning_rate=args.lr, max_completion_length=96, logging_steps=5)
    res["eval"]["after"] = accuracy(f"{OUT}/grpo-smollm", True, args.eval_rows, batch=50)
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["tiny", "smollm", "smollm-sft"], default="tiny")
    parser.add_argument("--model", default="posttrain/tiny-4m")
    parser.add_argument("--sft_steps", type=int, default=300)
    parser.add_argument("--grpo_steps", type=int, default=60)
    parser.add_argument("--eval_rows", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-6, help="GRPO learning rate (SmolLM2 stages)")
    parser.add_argument("--sft_lr", type=float, default=3e-5, help="SFT learning rate (stage smollm-sft)")
    args = parser.parse_args()
    torch.manual_seed(0)
    res = {"tiny": tiny, "smollm": smollm, "smollm-sft": smollm_sft}[args.stage](args)
    with open(f"{OUT}/{args.stage}.json", "w") as f:
        json.dump({**res, "argv": sys.argv}, f, indent=1, default=str)
    ev = res["eval"]
    for name, row in ev.items():
        print(f"| {name} | {row['accuracy']:.3f} | {row['tool_call_rate']:.3f} | {row['eval_s']:.0f} s |")
        print("   e.g.", json.dumps(row["example"])[:300])
    for name, row in res["grpo"].items() if args.stage != "smollm" else [("smollm", res["grpo"])]:
        print(f"grpo {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    if args.stage != "smollm":
        print("after SFT, tools vs plain:", paired(ev["sft-plain"], ev["sft-tools"]))
        print("after GRPO, tools vs plain:", paired(ev["grpo-plain"], ev["grpo-tools"]))
        print("GRPO with tools, before → after:", paired(ev["sft-tools"], ev["grpo-tools"]))
        print("GRPO without tools, before → after:", paired(ev["sft-plain"], ev["grpo-plain"]))
    else:
        print("before → after:", paired(ev["before"], ev["after"]))


if __name__ == "__main__":
    main()
