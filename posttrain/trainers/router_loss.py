"""The Mixture-of-Experts router load-balancing loss, added to every trainer's loss (`router_aux_loss_coef`).

An MoE model in transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, …) declares `output_router_logits` and
`router_aux_loss_coef` in its config; with `output_router_logits` on, its forward returns `aux_loss` (the
Switch-Transformer load-balancing loss of its routers). posttrain's trainers call the model without labels (they
compute their own losses), so the model never adds it itself: here a forward hook collects it and the wrapped
`compute_loss` adds `coef × aux_loss`, divided by the gradient-accumulation steps (the trainers' losses are already
divided by the global item count of the whole accumulated batch, so each micro-batch's mean aux loss must be too).
The online trainers (GRPO, RLOO, online DPO, PPO, distillation) get it the same way: their rollout passes (generation,
sampling-policy and reference log-probs) run before `compute_loss` and are not counted; the policy's log-prob pass
runs without the shared-prompt split so its router loss covers whole rows, as TRL's does (`models/shared_prefix.py`).

Coefficient: `router_aux_loss_coef` when set, else the model config's own (0 when it declares none); 0 turns it
off. Setting it for a model without a router is an error. The model config's `output_router_logits` and
`router_aux_loss_coef` are set to match, so `router_aux_loss_coef=0` reliably switches the router logits off.

Which forward counts: in training, the forwards that build a graph (the policy's; a PEFT reference pass runs
without gradients and is skipped); in evaluation the first forward of the step (the policy runs before any
reference). Logged as `aux_loss`.

Not here: the trainers' own losses (their modules).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from posttrain.errors import UserError


def _text_config(model):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def setup(model, args) -> tuple[float, bool]:
    """(coefficient, enabled) for `model` under `args.router_aux_loss_coef`; syncs the model config to them."""
    config = _text_config(model)
    given = getattr(args, "router_aux_loss_coef", None)
    has_router = config is not None and hasattr(config, "output_router_logits")
    if given and not has_router:
        raise UserError(f"router_aux_loss_coef={given} but {type(model).__name__} is not a Mixture-of-Experts model "
                        "returning router logits: there is no router loss to weight. Remove router_aux_loss_coef.")
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if given is None else float(given)
    enabled = has_router and coef != 0.0
    if config is not None and hasattr(config, "router_aux_loss_coef"):
        config.output_router_logits = enabled
        config.router_aux_loss_coef = coef
    return coef, enabled


@contextlib.contextmanager
def router_logits_off(model):
    """The model's forwards without router logits for the duration (the online trainers' rollouts: generation and
    the log-prob passes without gradients, which no loss reads the router loss of)."""
    config = _text_config(model)
    on = bool(getattr(config, "output_router_logits", False))
    if on:
        config.output_router_logits = False
    try:
        yield
    finally:
        if on:
            config.output_router_logits = True


class RouterLosses:
    """Collects `aux_loss` from every forward of the policy model (a forward hook on its innermost model)."""

    def __init__(self, model: torch.nn.Module):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps it
        self.values: list[torch.Tensor] = []
        self.handle = inner.register_forward_hook(functools.partial(_collect, weakref.ref(self)))

    def take(self, training: bool) -> torch.Tensor | None:
        """The aux loss of this compute_loss call (mean over its graph-building forwards), clearing the list."""
        values, self.values = self.values, []
        if training:
            values = [v for v in values if v.requires_grad]
        if not values:
            return None
        return values[0] if not training else torch.stack([v.float() for v in values]).mean()


def _collect(owner, module, args, output) -> None:
    losses = owner()
    aux = getattr(output, "aux_loss", None) if losses is not None else None
    if torch.is_tensor(aux):
        losses.values.append(aux)


def with_router_loss(compute_loss):
    """`compute_loss` that adds the router loss of the forwards it ran (the outermost call only, so a subclass
    calling `super().compute_loss` does not add it twice)."""

    @functools.wraps(compute_loss)
    def wrapped(self, model, inputs, *args, **kwargs):
        losses = getattr(self, "_router_losses", None)
        if losses is None or getattr(self, "_in_router_loss", False):
            return compute_loss(self, model, inputs, *args, **kwargs)  # the call as made (older signatures too)
        self._in_router_loss = True
        losses.values.clear()
        try:
            result = compute_loss(self, model, inputs, *args, **kwargs)
        finally:
            self._in_router_loss = False
        aux = losses.take(self.model.training)
        if aux is None:
            return result
        loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        # the loss is a share of the accumulated step's when the step's item count came with the call or, in the
        # online trainers, with the micro-batch (its "num_items"); a direct call on one batch is its own mean
        step_share = num_items is not None or (isinstance(inputs, dict) and "num_items" in inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        scale = 1.0 / steps if (self.model.training and step_share) else 1.0
        loss = loss + self.router_aux_loss_coef * aux.to(loss.dtype) * scale
        self.record_metrics({"aux_loss": aux.detach().float()})
        return (loss, *rest) if rest is not None else loss

    return wrapped
