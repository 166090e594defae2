"""A visual task learned from zero: the built-in tiny VLM (posttrain/tiny-llava, random init) learns "What colour is
the shape?" (posttrain/data/shapes.py: six colours, three shapes, grey background, pixel noise) with SFT, then GRPO
with the colour reward improves it; held-out greedy accuracy before/after each stage with paired tests
(posttrain.evaluation.paired_comparison). Writes benchmarks/VISION.md (figures filled in by hand from the output).

    OMP_NUM_THREADS=1 taskset -c 0 nice python benchmarks/vision_demo.py [--sft_steps 50 --grpo_steps 60 --test 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from posttrain.configs.grpo import GRPOConfig  # noqa: E402
from posttrain.configs.sft import SFTConfig  # noqa: E402
from posttrain.data import vision as dv  # noqa: E402
from posttrain.data.shapes import answer_of, colour_reward, shapes_dataset  # noqa: E402
from posttrain.evaluation import paired_comparison  # noqa: E402
from posttrain.models import loading  # noqa: E402
from posttrain.models import vision as mv  # noqa: E402
from posttrain.rollout.vision import to_model  # noqa: E402
from posttrain.trainers.grpo import GRPOTrainer  # noqa: E402
from posttrain.trainers.sft import SFTTrainer  # noqa: E402


@torch.no_grad()
def accuracy(model_path: str, test, batch: int = 50) -> dict:
    """Greedy answers to the held-out questions: per-question scores and accuracy."""
    model = loading.load_pretrained_model(model_path).eval()
    processor = mv.load_processor(loading.resolve_model_path(model_path))
    tokens = dv.ImageTokenizer(processor)
    pad = processor.tokenizer.pad_token_id
    scores = []
    for start in range(0, len(test), batch):
        rows = test.select(range(start, min(start + batch, len(test))))
        ids = [dv.prompt_ids_with_images(tokens, r["prompt"], r["images"], "test") for r in rows]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        pixels = to_model(tokens.pixel_inputs([r["images"] for r in rows]), model)
        out = model.generate(input_ids=input_ids, attention_mask=mask, **pixels, **tokens.token_types(input_ids),
                             max_new_tokens=4, do_sample=False,
                             pad_token_id=pad)
        texts = processor.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        scores += [float(answer_of(t) == r["answer"]) for t, r in zip(texts, rows)]
    return {"scores": scores, "accuracy": sum(scores) / len(scores)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sft_steps", type=int, default=50)
    p.add_argument("--grpo_steps", type=int, default=60)
    p.add_argument("--grpo_lr", type=float, default=3e-4)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--out", default="outputs/vision-demo")
    args = p.parse_args()
    test = shapes_dataset(args.test, "test", kind="prompt")
    results = {"before": accuracy("posttrain/tiny-llava", test)}
    print("before:", results["before"]["accuracy"], flush=True)
    start = time.time()
    sft = SFTTrainer("posttrain/tiny-llava", train_dataset=shapes_dataset(args.train, "train"),
                     args=SFTConfig(output_dir=f"{args.out}/sft", max_steps=args.sft_steps,
                                    per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant",
                                    warmup_steps=0, logging_steps=10, report_to="none", save_strategy="no",
                                    disable_tqdm=True, seed=0))
    sft.train()
    sft.save_model()
    sft_seconds = time.time() - start
    results["sft"] = accuracy(f"{args.out}/sft", test)
    print("after SFT:", results["sft"]["accuracy"], f"({sft_seconds:.0f}s)", flush=True)
    start = time.time()
    grpo = GRPOTrainer(f"{args.out}/sft", reward_funcs=colour_reward,
                       train_dataset=shapes_dataset(args.train, "train-rl", kind="prompt"),
                       args=GRPOConfig(output_dir=f"{args.out}/grpo", max_steps=args.grpo_steps,
                                       per_device_train_batch_size=32, num_generations=8, max_completion_length=4,
                                       learning_rate=args.grpo_lr, beta=0.0, temperature=1.0, logging_steps=5,
                                       report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                                       log_completions=True))
    grpo.train()
    grpo.save_model()
    grpo_seconds = time.time() - start
    results["grpo"] = accuracy(f"{args.out}/grpo", test)
    print("after GRPO:", results["grpo"]["accuracy"], f"({grpo_seconds:.0f}s)", flush=True)
    summary = {k: v["accuracy"] for k, v in results.items()}
    summary["sft_vs_before"] = paired_comparison(results["before"]["scores"], results["sft"]["scores"])
    summary["grpo_vs_sft"] = paired_comparison(results["sft"]["scores"], results["grpo"]["scores"])
    summary["seconds"] = {"sft": sft_seconds, "grpo": grpo_seconds}
    summary["grpo_rewards"] = [h.get("reward") for h in grpo.state.log_history if "reward" in h]
    print(json.dumps(summary, indent=1, default=str))
    os.makedirs(args.out, exist_ok=True)
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)


if __name__ == "__main__":
    main()
