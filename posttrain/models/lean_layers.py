"""Lean layers: the RMSNorm and SwiGLU MLP of Llama/Qwen2/Mistral-style models as autograd functions that
keep fewer activations for the backward and recompute the element-wise rest there (selective activation
checkpointing of the cheap parts: no matmul is recomputed).

Per token and layer, transformers' modules keep for the backward: each RMSNorm its input, its normalised output
before the weight, and the output (the next matmuls' input); the MLP its input, gate, silu(gate), up and
silu(gate)·up. The functions here keep the norm's input and output only, and the MLP's input, gate and up: on a
576-wide, 1,536-intermediate layer (SmolLM2-135M) that is ~4,200 of ~11,000 saved floats per token less, for a
few element-wise passes in the backward. Results and gradients are those of the modules (same formulas;
tests/test_lean_layers.py).

`apply_lean_layers(model)` patches the `forward` of the modules it recognises in place (instance attributes, so
saving, loading and `state_dict` are unchanged); anything else — LoRA-wrapped or biased MLP projections, other
activations, Gemma's (1 + weight) norm — keeps its own forward. Under autocast the MLP casts its input and
weights to the autocast dtype itself, as autocast would for the three linears, and the other plain linears
(attention projections, the LM head) do the same through `_CastLinear`: autocast keeps each linear's
low-precision weight copy from the forward to the backward (all layers' copies at once, ~53 MB of attention
weights on SmolLM2-135M when its backward starts); these cast again in the backward instead. Not under
ZeRO-3/FSDP: they gather weights in the Linear modules' hooks, which the fused MLP bypasses (`trainers/base.py`
does not call it there).

Not here: the LM head and log-softmax (`models/logprobs.py`), full gradient checkpointing (transformers).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Norms with exactly LlamaRMSNorm's formula: weight * (x / sqrt(mean(x²) + eps)), computed in float32.
RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen3MoeRMSNorm",
                       "Qwen2MoeRMSNorm", "OlmoRMSNorm", "SmolLM3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm"})
_SILU_NAMES = ("SiLU", "SiLUActivation")


class _RMSNorm(torch.autograd.Function):
    """y = w · (x · r), r = 1/sqrt(mean(x²) + eps) in float32; keeps x and r, recomputes x · r in the backward.

    Backward (n = x·r): dw = Σ dy·n, dx = r · (dn − n · mean(dn·n)) with dn = dy·w.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).float()
            dx = dn.sub_(n * (dn * n).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    """y = down(silu(gate(x)) · up(x)) for bias-free projections; keeps x, gate(x) and up(x) (not silu(gate),
    nor the product) and recomputes those two in the backward. `dtype` (autocast's): the matmuls run on weights cast
    to it, cast again in the backward rather than kept, so the 30-odd layers' low-precision weight copies are not
    all held from the forward to the backward; the gradients come back in the weights' own dtype.

    Backward (s = σ(g), a = g·s, h = a·u): dh = dy·W_down, dW_down = dyᵀh, du = dh·a,
    dg = dh·u·s·(1 + g·(1 − s)), dx = dg·W_gate + du·W_up, dW_gate = dgᵀx, dW_up = duᵀx.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, dtype: torch.dtype | None = None):
        ctx.dtype = dtype
        weights = (w_gate, w_up, w_down)
        if dtype is not None:
            w_gate, w_up, w_down = w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
        g, u = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, g, u, *weights)
        return F.linear(F.silu(g) * u, w_down)

    @staticmethod
    def backward(ctx, dy):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        out_dtype = w_gate.dtype
        if ctx.dtype is not None:
            w_gate, w_up, w_down = w_gate.to(ctx.dtype), w_up.to(ctx.dtype), w_down.to(ctx.dtype)
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        s = torch.sigmoid(g)
        a = g * s
        flat_dy = dy.reshape(-1, dy.shape[-1])
        d_down = flat_dy.t().mm((a * u).reshape(-1, u.shape[-1])).to(out_dtype) if need_down else None
        dh = F.linear(dy, w_down.t())
        du = dh * a
        del a
        dg = s.neg().add_(1).mul_(g).add_(1).mul_(s).mul_(u).mul_(dh)  # dh·u·s·(1 + g(1 − s))
        del s, dh
        flat_x = x.reshape(-1, x.shape[-1])
        d_gate = dg.reshape(-1, dg.shape[-1]).t().mm(flat_x).to(out_dtype) if need_gate else None
        d_up = du.reshape(-1, du.shape[-1]).t().mm(flat_x).to(out_dtype) if need_up else None
        dx = torch.matmul(dg, w_gate).add_(torch.matmul(du, w_up)) if need_x else None
        return dx, d_gate, d_up, d_down, None


class _CastLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with W and b cast to `dtype` inside (what autocast does to a linear), keeping the float32
    weight rather than its cast: the backward casts it again. Gradients come back in the weights' own dtype; the
    same values as autograd through the casts, bit for bit.

    Backward: dx = dy·W, dW = dyᵀx, db = Σ dy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype: torch.dtype):
        ctx.dtype = dtype
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        flat_dy = dy.reshape(-1, dy.shape[-1])
        d_weight = flat_dy.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype) if need_weight else None
        d_bias = flat_dy.sum(0).to(ctx.bias_dtype) if need_bias else None
        dx = torch.matmul(dy, weight.to(ctx.dtype)) if need_x else None
        return dx, d_weight, d_bias, None


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _lean_norm_forward(self, hidden_states):
    if not torch.is_grad_enabled():  # nothing is kept for a backward: the module's own forward
        return type(self).forward(self, hidden_states)
    # no matmul inside: under autocast these ops run in the dtypes they have in the module's own forward
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x):
    if not torch.is_grad_enabled():
        # Nothing is kept for a backward (rollouts, reference and old log-probs): the module's own forward, whose
        # linears go through autocast and so reuse its cached weight casts across the decode steps of one autocast
        # block; the explicit casts below would cast every weight again at every token.
        return type(self).forward(self, x)
    weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    if not _autocasting(x):
        return _SwiGLU.apply(x, *weights)
    # What autocast does to the module's three linears, made explicit: the input and the weights cast to the
    # autocast dtype, everything in it; the float32 weights get float32 gradients.
    device = x.device.type
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _SwiGLU.apply(x.to(dtype), *weights, dtype)


def _lean_linear_forward(self, x):
    if not torch.is_grad_enabled() or not _autocasting(x):  # nothing kept, or nothing cast: the module's own
        return type(self).forward(self, x)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _CastLinear.apply(x.to(dtype), self.weight, self.bias, dtype)


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (all(p is not None and _plain_linear(p) for p in parts) and type(act).__name__ in _SILU_NAMES
            and type(module).__name__.endswith("MLP"))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return (type(module).__name__ in RMS_NORMS and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def apply_lean_layers(model: torch.nn.Module) -> dict[str, int]:
    """Route every recognised RMSNorm and SwiGLU MLP of `model`, and its other plain linears, through the lean
    functions (idempotent). Returns how many of each were patched."""
    counts = {"rms_norm": 0, "swiglu_mlp": 0, "linear": 0}
    in_fused_mlp = set()  # the fused MLP does not call its projections' forward
    for module in model.modules():
        if _is_swiglu_mlp(module):
            in_fused_mlp.update(id(getattr(module, name)) for name in ("gate_proj", "up_proj", "down_proj"))
    for module in model.modules():
        if getattr(module, "_posttrain_lean", False):
            continue
        if _is_rms_norm(module):
            module.forward = types.MethodType(_lean_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            counts["swiglu_mlp"] += 1
        elif type(module) is torch.nn.Linear and id(module) not in in_fused_mlp:
            module.forward = types.MethodType(_lean_linear_forward, module)
            counts["linear"] += 1
        else:
            continue
        module._posttrain_lean = True
    return counts


def remove_lean_layers(model: torch.nn.Module) -> None:
    """Give every patched module its own forward back."""
    for module in model.modules():
        if getattr(module, "_posttrain_lean", False):
            del module.forward
            del module._posttrain_lean
