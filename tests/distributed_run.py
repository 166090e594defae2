"""Tiny SFT, DPO, GRPO and RLOO runs with a fixed *global* batch, for the 1-process vs 2-process comparison.

`python tests/distributed_run.py OUT_DIR METHOD...` (or under `accelerate launch --num_processes 2 --cpu`) trains
each METHOD for STEPS steps and writes OUT_DIR/METHOD.json (the per-step losses, from process 0). The per-device
batch is GLOBAL_BATCH / number of processes, so every layout sees the same global batch.

Under an engine that shards (`accelerate launch` with a DeepSpeed or FSDP2 config, tests/test_sharded.py) the same
runs record what the engine did (ENGINE), and two knobs apply: POSTTRAIN_TEST_HEAD_ROWS=n runs the LM head in
chunks of n rows with gradients (chunked_lm_head) and without, so processes holding different numbers of trained
tokens make different numbers of chunks; POSTTRAIN_TEST_SAVE=1 saves each final model to OUT_DIR/METHOD-model.
After GRPO a decode check (OUT_DIR/decode-RANK.json) makes process 0 end every row at its first token while the
others decode the full length: with collective forwards (ZeRO-3, FSDP) the decode loop must keep them all stepping.

GRPO/RLOO: sampling differs with the layout (batch composition changes the random draws), so these runs make the
rollout deterministic and layout-independent: generation is greedy (top_k=1) through the real rollout path, then
row i of a group keeps its first 1 + 2·(i mod G) tokens; the reward is the built-in length_reward. What is
compared is the training maths given the same rollouts: reward gathering across processes, group advantages over
groups that span processes, old/reference log-probs and the global loss normalisation.
"""

from __future__ import annotations

import json
import os
import sys

import torch

MODEL = "posttrain/tiny"
STEPS = 3
GLOBAL_BATCH = {"sft": 4, "dpo": 4, "grpo": 12, "rloo": 12, "grpo_bnpo": 12}
# grpo_bnpo: 2 processes × 2 accumulation steps of 3 rows against 1 process × 1 micro-batch of 12, with a loss type
# whose token normaliser used to be local to a micro-batch (one reduction contract: trainers/online.py)
ACCUMULATION = {"grpo_bnpo": 2}
G = 4  # a 6-row slice per process holds one whole group and half of another: groups span processes


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _common(output_dir: str, method: str) -> dict:
    accumulation = ACCUMULATION.get(method, 1) if _world() > 1 else 1
    return dict(output_dir=os.path.join(output_dir, method), max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
                per_device_train_batch_size=GLOBAL_BATCH[method] // _world() // accumulation,
                gradient_accumulation_steps=accumulation,
                report_to="none", save_strategy="no", disable_dropout=True, seed=0, use_cpu=True)


def _truncating(cls):
    """`cls` whose rollouts are greedy and then cut to a length set by the row's place in its group."""

    class Truncating(cls):
        def sample(self, rows):
            rollout = super().sample(rows)
            offset = self.accelerator.process_index * len(rows)
            keep = torch.tensor([1 + 2 * ((offset + i) % G) for i in range(len(rows))])
            columns = torch.arange(rollout.completion_mask.shape[1])
            cut = (columns[None, :] < keep[:, None]).to(rollout.completion_mask.dtype)
            rollout.completion_mask = rollout.completion_mask * cut.to(rollout.completion_mask.device)
            rollout.completion_ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0,
                                                                        self.processing_class.pad_token_id)
            return rollout

    return Truncating


def _knobs(common: dict) -> dict:
    rows = int(os.environ.get("POSTTRAIN_TEST_HEAD_ROWS", "0"))
    if rows:
        from posttrain.models import logprobs

        logprobs.CHUNK_ROWS = logprobs.HEAD_CHUNK_ROWS = rows
        defaults = logprobs.token_logps.__defaults__  # chunk_size's default was bound at import
        logprobs.token_logps.__defaults__ = tuple(rows if d == 128 else d for d in defaults)
        common["chunked_lm_head"] = "true"
    return common


def build(method: str, output_dir: str):
    from posttrain.data.arith import load_builtin_dataset

    common = _knobs(_common(output_dir, method))
    if method == "sft":
        from posttrain import SFTConfig, SFTTrainer

        return SFTTrainer(MODEL, args=SFTConfig(**common, max_length=64),
                          train_dataset=load_builtin_dataset("posttrain/arith-sft", split="train"))
    if method == "dpo":
        from posttrain import DPOConfig, DPOTrainer

        return DPOTrainer(MODEL, args=DPOConfig(**common, beta=0.1, max_length=64),
                          train_dataset=load_builtin_dataset("posttrain/arith-pref", split="train"))
    online = dict(num_generations=G, max_completion_length=8, top_k=1, beta=0.1)
    prompts = load_builtin_dataset("posttrain/arith-prompts", split="train")
    if method in ("grpo", "grpo_bnpo"):
        from posttrain import GRPOConfig, GRPOTrainer

        loss = {"loss_type": "bnpo"} if method == "grpo_bnpo" else {}
        return _truncating(GRPOTrainer)(MODEL, reward_funcs="length_reward",
                                        args=GRPOConfig(**common, **online, **loss), train_dataset=prompts)
    if method == "rloo":
        from posttrain import RLOOConfig, RLOOTrainer

        return _truncating(RLOOTrainer)(MODEL, reward_funcs="length_reward", args=RLOOConfig(**common, **online),
                                        train_dataset=prompts)
    raise SystemExit(f"unknown method {method!r}")


def engine(trainer) -> dict:
    """What the run's engine did: accelerate's distributed type, the ZeRO stage, and whether the trained and the
    reference model hold sharded parameters (ZeRO-3 partitions carry a ds_id; FSDP2 shards are DTensors)."""
    from torch.distributed.tensor import DTensor

    def sharded(model):
        return model is not None and any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())

    plugin = trainer.accelerator.state.deepspeed_plugin
    return {"type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "zero_stage": plugin.zero_stage if plugin is not None else None,
            "policy_wrapper": type(trainer.model_wrapped).__name__, "policy_sharded": sharded(trainer.model),
            "ref_wrapper": type(getattr(trainer, "ref_model", None)).__name__,
            "ref_sharded": sharded(getattr(trainer, "ref_model", None))}


def decode(trainer, output_dir: str) -> None:
    """Process 0's rows end at their first token (every id is an EOS there); the others decode all 8 tokens (the
    tiny model's greedy completions hold no EOS)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.process_index == 0:
        policy.generation_config.eos_token_id = list(range(policy.config.vocab_size))
    prompt = trainer.processing_class("1 + 2 =")["input_ids"]
    rollout = trainer.generate_completions([prompt, prompt], 2, max_new_tokens=8)
    lengths = rollout.completion_mask.sum(-1).tolist()
    with open(os.path.join(output_dir, f"decode-{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump({"lengths": lengths, **engine(trainer)}, f)


def main(output_dir: str, methods: list[str]) -> None:
    for method in methods:
        trainer = build(method, output_dir)
        trainer.train()
        if os.environ.get("POSTTRAIN_TEST_SAVE") == "1":
            trainer.save_model(os.path.join(output_dir, f"{method}-model"))
        if method == "grpo":
            decode(trainer, output_dir)
        if trainer.is_world_process_zero():
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            with open(os.path.join(output_dir, f"{method}.json"), "w") as f:
                json.dump({"world_size": _world(), "losses": losses, "engine": engine(trainer)}, f)
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
