"""The reference: the frozen policy a method is anchored to (DPO, KTO, GRPO/RLOO with β > 0, online DPO, PPO).

Lives here: `Reference`, the one component every such trainer holds, built once by `Reference.build` from what the
user gave — a model object, a name or path, or nothing (a frozen copy of the policy; or, when PEFT adapters are
trained, no second model at all: the base with adapters disabled is the reference) — frozen, dropout off when asked,
placed like the policy (`models/sharding.py`), with TR-DPO's periodic mixing of the policy into it. Also the
context that switches a PEFT model to its reference, the preparation every frozen model beside the policy gets
(`prepare_frozen_model`, also the distillation teacher's: `models/teacher.py`), and a fingerprint of weights (for
caches of reference log-probs), and TRL's public `create_reference_model` (a frozen copy sharing its first layers
with the policy if asked). Whether a run needs a reference at all is the trainer's one question, `holds_reference()`.
Not here: computing log-probs (`models/logprobs.py`), precomputing them over a dataset (`trainers/anchored.py`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from transformers import TrainerCallback

from posttrain.errors import UserError
from posttrain.models import adapters, loading, sharding
from posttrain.models.adapters import is_peft_model
from posttrain.models.lean_layers import apply_lean_layers
from posttrain.models.packed_attention import use_packed_attention

# where the decoder blocks of common architectures live (GPT-2, OPT/BART decoders, GPT-NeoX, Llama-like)
_LAYER_PATTERNS = ("transformer.h.{layer}", "model.decoder.layers.{layer}", "gpt_neox.layers.{layer}",
                   "model.layers.{layer}")


def create_reference_model(model: torch.nn.Module, num_shared_layers: int | None = None,
                           pattern: str | None = None) -> torch.nn.Module:
    """TRL's `create_reference_model`: a static reference copy of `model`, in eval mode, no parameter trainable.

    num_shared_layers: the parameters before decoder block `num_shared_layers` (embeddings and blocks
    0..num_shared_layers-1) are not copied but shared with `model`, and frozen in `model` too (so the reference
    stays static while they are held once in memory). pattern: the name of block `{layer}` (e.g.
    "transformer.h.{layer}"); by default the first of the common layouts found in the parameter names. Not
    under DeepSpeed ZeRO-3 (parameters are partitioned; load the reference separately). Where TRL only warns, a
    pattern matching no parameter is an error here: it would share, and freeze, the whole model.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise UserError("create_reference_model cannot copy a model partitioned by DeepSpeed ZeRO-3; load the "
                        "reference with AutoModelForCausalLM.from_pretrained(...) instead.")
    names = [name for name, _ in model.named_parameters()]
    ref = copy.deepcopy(model)
    if num_shared_layers is not None:
        if pattern is None:
            found = (p.format(layer=num_shared_layers) for p in _LAYER_PATTERNS)
            pattern = next((p for p in found if any(p in name for name in names)), None)
            if pattern is None:
                raise UserError(f"create_reference_model: none of the known layer names "
                                f"({', '.join(_LAYER_PATTERNS)}) is in {type(model).__name__}'s parameters; give "
                                "pattern='<prefix>.{layer}' for this architecture.")
        else:
            pattern = pattern.format(layer=num_shared_layers)
        first = next((i for i, name in enumerate(names) if pattern in name), None)
        if first is None:
            raise UserError(f"create_reference_model: no parameter name contains {pattern!r}, so every layer would "
                            f"be shared and frozen; check pattern and num_shared_layers={num_shared_layers}.")
        for name in names[:first]:  # one tensor for both models: frozen in the policy, so the reference is static
            source = model.get_parameter(name)
            source.requires_grad_(False)
            ref.get_parameter(name).data = source.data
    return ref.eval().requires_grad_(False)


def prepare_frozen_model(trainer, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model that sits beside the policy (a reference, a distillation teacher): eval mode without gradients,
    no Mixture-of-Experts router logits, dropout off when asked, the policy's packed attention and lean layers (the same arithmetic: policy = reference
    gives KL 0 exactly), placed as the policy is (`models/sharding.py`)."""
    args = trainer.args
    model.eval().requires_grad_(False)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "output_router_logits", False):
        text.output_router_logits = False  # a frozen MoE model's router loss is never trained: not computed
    if args.disable_dropout:
        loading.disable_dropout(model)
    if getattr(args, "packed_attention", False):
        use_packed_attention(model)  # its padded log-prob passes run as packed rows
    if getattr(args, "lean_layers", False) and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        apply_lean_layers(model)
    return sharding.prepare_frozen(trainer.accelerator, model, args)


class Reference:
    """A trainer's reference. `model` is the frozen reference model, or None when the reference is the policy
    itself with its adapters switched (PEFT) or when log-probs were precomputed; `context(policy)` yields the module
    that computes reference log-probs either way."""

    def __init__(self, model: torch.nn.Module | None, unwrap=lambda m: m):
        self.model, self._unwrap = model, unwrap

    @classmethod
    def build(cls, trainer, ref_model=None, model_id: str | None = None) -> Reference | None:
        """The reference of `trainer` (after its base constructor), or None when `trainer.holds_reference()` is
        False. ref_model: a model, a name/path (loaded with the run's model_init_kwargs), or None."""
        args, policy, name = trainer.args, trainer.model, type(trainer).__name__
        if not trainer.holds_reference():
            if ref_model is not None:
                raise UserError(f"{name} got ref_model=... but this configuration uses no reference "
                                f"({trainer.no_reference_reason()}); drop ref_model or enable the KL term.")
            return None
        if ref_model is policy or (ref_model is not None and ref_model is getattr(policy, "base_model", None)):
            raise UserError(f"{name} got the policy itself as ref_model: training would move the reference with "
                            "it. Pass a separate copy (e.g. load the checkpoint twice) or leave ref_model out "
                            "(a frozen copy is made).")
        if ref_model is None and not is_peft_model(policy):  # a copy: reloaded when the policy was given by name
            ref_model = model_id if model_id is not None else copy.deepcopy(policy)
        if isinstance(ref_model, str):
            ref_model = loading.load_pretrained_model(ref_model, None, **(args.model_init_kwargs or {}))
        if ref_model is not None:
            ref_model = prepare_frozen_model(trainer, ref_model)
        reference = cls(ref_model, trainer.accelerator.unwrap_model)
        if getattr(args, "sync_ref_model", False):
            if ref_model is None:
                raise UserError("sync_ref_model needs a separate reference model; it does not work with PEFT "
                                "adapters (the reference is the base model).")
            trainer.add_callback(SyncReferenceCallback(reference, policy, args.ref_model_sync_steps,
                                                       args.ref_model_mixup_alpha))
        return reference

    @contextlib.contextmanager
    def context(self, policy: torch.nn.Module):
        """Yield the module that computes reference log-probs: the reference model; or the policy with its frozen
        reference adapter switched in (a model given with an adapter, `models/adapters.py`); or the policy with
        adapters off."""
        if self.model is not None:
            yield self.model
            return
        base = self._unwrap(policy)
        if not is_peft_model(base):
            raise UserError("No reference model: pass ref_model=..., train PEFT adapters, or precompute reference "
                            "log-probs (precompute_ref_log_probs=True).")
        if adapters.has_reference_adapter(base):
            active = base.active_adapter
            base.set_adapter(adapters.REFERENCE_ADAPTER)
            try:
                yield policy
            finally:
                base.set_adapter(active)
                adapters.freeze_reference_adapter(base)  # set_adapter marks the adapter it switches in trainable
            return
        with base.disable_adapter():
            yield policy


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order (identifies the weights a cache was computed with)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class SyncReferenceCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024): every `steps` optimizer steps, ref ← α·policy + (1−α)·ref."""

    def __init__(self, reference: Reference, policy: torch.nn.Module, steps: int, alpha: float):
        self.reference, self.policy, self.steps, self.alpha = reference, policy, steps, alpha

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0 and self.reference.model is not None:
            mix_into(self.reference.model, self.policy, self.alpha)


@torch.no_grad()
def mix_into(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's soft update, in place: target ← α·source + (1−α)·target, parameter by parameter (same order)."""
    for target_param, param in zip(target.parameters(), source.parameters(), strict=True):
        target_param.mul_(1 - alpha).add_(param.detach().to(target_param.dtype), alpha=alpha)
