"""Frozen models (reference, reward) placed the way the trained model is: sharded under DeepSpeed ZeRO-3 and FSDP,
without an optimizer; moved to the device otherwise.

Every frozen model goes through `prepare_frozen`: the references of DPO/KTO (`trainers/anchored.py`), of GRPO,
RLOO, online DPO and PPO, and every reward model of an online trainer (`trainers/online.py`, which hands it to
`RewardRunner.place`). What comes back may be a DeepSpeed engine or an FSDP module whose parameters are
placeholders or shards: callers use its forward only, and take the device from the accelerator, not from its
parameters. Under ZeRO-3 each forward gathers parameters collectively, so every process must run the same number
of forwards (online trainers give every process a generation batch of the same size).
PPO's critic is not here: it is trained, and sits with the policy in the one container the Trainer prepares.

ZeRO-3: `deepspeed.initialize` with the run's DeepSpeed config minus optimizer and scheduler (ZeRO-1/2 shard only
optimizer state, which a frozen model has none of: stage 0 there, a plain replica). FSDP2: `fully_shard` per
layer through accelerate's FSDP2 preparation; FSDP1: accelerate's FSDP wrapping. These paths need CUDA and were
written against the accelerate/DeepSpeed APIs and have not run on a GPU here; the CPU test suite runs the plain path
for real and the ZeRO path against a stand-in `deepspeed` module (tests/test_sharding.py: the config handed to
`deepspeed.initialize`, and scoring and reference log-probs through the returned wrapper), not FSDP.

Not here: which models are references (`models/reference.py`, trainers).
"""

from __future__ import annotations

import copy

import torch


def prepare_frozen(accelerator, model: torch.nn.Module, args) -> torch.nn.Module:
    """`model` (frozen, eval mode) ready for inference beside the trained model under this run's accelerator."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return _deepspeed_inference(accelerator, model, args)
    if kind == DistributedType.FSDP:
        if getattr(accelerator, "is_fsdp2", False):
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model.to(accelerator.device)).eval()
        return accelerator.prepare_model(model).eval()
    return model.to(args.device)


def _deepspeed_inference(accelerator, model: torch.nn.Module, args) -> torch.nn.Module:
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    for precision, enabled in (("bf16", args.bf16), ("fp16", args.fp16)):
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = bool(enabled)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0  # nothing to shard without optimizer state: a plain replica
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
