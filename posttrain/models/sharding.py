"""Frozen models (reference, reward) placed the way the trained model is: sharded under DeepSpeed ZeRO-3 and FSDP,
without an optimizer; moved to the device otherwise. Also: FSDP on CPU processes, and whether a module's forwards
are collectives.

Every frozen model goes through `prepare_frozen`: the references of DPO/KTO (`trainers/anchored.py`), of GRPO,
RLOO, online DPO and PPO, and every reward model of an online trainer (`trainers/online.py`, which hands it to
`RewardRunner.place`). What comes back may be a DeepSpeed engine or an FSDP module whose parameters are
placeholders or shards: callers use its forward only, and take the device from the accelerator, not from its
parameters. Under ZeRO-3 and FSDP each forward gathers parameters collectively, so every process must run the same
number of forwards (`collective_forwards` tells the log-prob passes and the decode loop to keep them equal; online
trainers give every process a generation batch of the same size).
PPO's critic is not here: it is trained, and sits with the policy in the one container the Trainer prepares.

ZeRO-3: `deepspeed.initialize` with the run's DeepSpeed config minus optimizer and scheduler (ZeRO-1/2 shard only
optimizer state, which a frozen model has none of: stage 0 there, a plain replica). FSDP2: `fully_shard` per
layer through accelerate's FSDP2 preparation; FSDP1: accelerate's FSDP wrapping.
Run for real on CPU processes over gloo (tests/test_sharded.py: DeepSpeed 0.19.8 ZeRO-2/3 and torch FSDP2 through
accelerate 1.15, 2 processes against 1, SFT/DPO/GRPO); FSDP1 and GPUs (NCCL) have not run here.
accelerate selects FSDP only for GPU-like devices: on CPU processes `fsdp_on_cpu` switches a launch that asked for
FSDP2 from plain multi-CPU DDP to FSDP.

Not here: which models are references (`models/reference.py`, trainers).
"""

from __future__ import annotations

import copy

import torch

from posttrain.errors import UserError


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


def fsdp_on_cpu(accelerator) -> bool:
    """Under `accelerate launch` with an FSDP2 config on CPU processes, make `accelerator` an FSDP one; True if it did.

    accelerate (1.15) turns a launch's FSDP settings into FSDP only for GPU-like devices; on CPUs it runs plain
    multi-CPU DDP and ignores them. torch's `fully_shard` runs on CPU over gloo, so the state is switched here, once,
    right after the Accelerator is made and before anything is prepared."""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or state.distributed_type != DistributedType.MULTI_CPU):
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes needs fsdp_version: 2 (FSDP1 needs CUDA GPUs); use "
                        "--accelerate_config fsdp2")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def collective_forwards(module: torch.nn.Module) -> bool:
    """Whether every forward of `module` is a collective across processes: DeepSpeed ZeRO-3 (partitioned
    parameters carry a `ds_id`) and FSDP gather parameters on each call, so all processes must call it equally
    often or they hang. False with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return (any(hasattr(p, "ds_id") for p in module.parameters())
            or any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules()))


def max_over_processes(value: int, device: torch.device) -> int:
    """The largest `value` any process holds (every process must call this)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
