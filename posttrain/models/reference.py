"""Reference models for methods anchored to a frozen policy (DPO, KTO, GRPO with β > 0, PPO).

Lives here: creating the reference (a frozen copy; nothing when PEFT adapters are trained, since the base with
adapters disabled is the reference), the context that switches a PEFT model to its reference, TR-DPO's periodic
mixing of the policy into the reference, and a fingerprint of weights (for caches of reference log-probs).
Not here: computing log-probs (`models/logprobs.py`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from transformers import TrainerCallback

from posttrain.models import adapters, loading


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def create_reference_model(model: torch.nn.Module, model_id: str | None = None,
                           init_kwargs: dict | None = None) -> torch.nn.Module | None:
    """A frozen, eval-mode reference: None for PEFT models (adapters get disabled instead), else a copy
    (reloaded from `model_id` when the policy was given by name, so no copy of live weights is needed)."""
    if is_peft_model(model):
        return None
    if model_id is not None:
        ref = loading.load_pretrained_model(model_id, None, **(init_kwargs or {}))
    else:
        ref = copy.deepcopy(model)
    return freeze(ref)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextlib.contextmanager
def reference_context(policy: torch.nn.Module, ref_model: torch.nn.Module | None, unwrap=lambda m: m):
    """Yield the module that computes reference log-probs: `ref_model`; or the policy with its frozen reference
    adapter switched in (a model given with an adapter, `models/adapters.py`); or the policy with adapters off."""
    if ref_model is not None:
        yield ref_model
        return
    base = unwrap(policy)
    if not is_peft_model(base):
        raise ValueError("No reference model: pass ref_model=..., train PEFT adapters, or precompute reference "
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

    def __init__(self, ref_model: torch.nn.Module, policy: torch.nn.Module, steps: int, alpha: float):
        self.ref_model, self.policy, self.steps, self.alpha = ref_model, policy, steps, alpha

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            for ref_param, param in zip(self.ref_model.parameters(), self.policy.parameters()):
                ref_param.mul_(1 - self.alpha).add_(param.detach().to(ref_param.dtype), alpha=self.alpha)
