"""Lean layers (models/lean_layers.py): the patched RMSNorm and SwiGLU MLP give the modules' outputs and gradients,
patching is idempotent and undoable, modules it does not recognise keep their forward, and the trainer option
`lean_layers` switches it on and off."""

import copy

import pytest
import torch

from posttrain.models.lean_layers import _CastLinear, _RMSNorm, _SwiGLU, apply_lean_layers, remove_lean_layers


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["posttrain/tiny", "posttrain/tiny-llama"])
def test_same_loss_and_gradients(name):
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model(name).double()
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    loss, grads = _loss_and_grads(model, ids)
    counts = apply_lean_layers(model)
    layers = model.config.num_hidden_layers
    # the other plain linears: q, k, v, o per layer (Qwen2's q/k/v with their biases) and the LM head
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu_mlp": layers, "linear": 4 * layers + 1}
    lean_loss, lean_grads = _loss_and_grads(model, ids)
    assert torch.allclose(lean_loss, loss, rtol=1e-12, atol=0)
    assert grads.keys() == lean_grads.keys()
    for key in grads:  # the norms compute in float32 (as transformers' do): equal to float32 rounding
        scale = grads[key].abs().max()
        assert (lean_grads[key] - grads[key]).abs().max() <= 1e-6 * scale, key
    assert apply_lean_layers(model) == {"rms_norm": 0, "swiglu_mlp": 0, "linear": 0}  # idempotent
    remove_lean_layers(model)
    assert "forward" not in vars(model.model.norm)


def test_functions_against_autograd_float32():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = _RMSNorm.apply(x, w, 1e-6)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(torch.autograd.grad(y, (x, w), g),
                                                                 torch.autograd.grad(ref, (x, w), g)))
    wg, wu, wd = (torch.randn(12, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True),
                  torch.randn(8, 12, requires_grad=True))
    y = _SwiGLU.apply(x, wg, wu, wd)
    ref = torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()) @ wd.t()
    assert torch.allclose(y, ref, atol=1e-5)
    got, want = torch.autograd.grad(y, (x, wg, wu, wd), g), torch.autograd.grad(ref, (x, wg, wu, wd), g)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(got, want))


def test_under_autocast():
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model("posttrain/tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids)
        apply_lean_layers(model)
        lean_loss, lean_grads = _loss_and_grads(model, ids)
    assert torch.allclose(lean_loss, loss, rtol=1e-2)
    for key in grads:
        assert lean_grads[key].dtype == torch.float32
        assert (lean_grads[key] - grads[key]).norm() <= 0.05 * grads[key].norm(), key


def test_autocast_mlp_casts_weights_inside_and_keeps_none():
    """Under autocast the MLP casts its weights itself and casts them again in the backward: the same gradients as
    differentiable casts outside, and no low-precision weight copy is kept from the forward to the backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8).bfloat16().requires_grad_()
    weights = [torch.randn(12, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True),
               torch.randn(8, 12, requires_grad=True)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _SwiGLU.apply(x, *weights, torch.bfloat16)
    shapes = {tuple(w.shape) for w in weights}
    assert not [t for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *weights], g)
    ref_y = _SwiGLU.apply(x, *(w.bfloat16() for w in weights))
    want = torch.autograd.grad(ref_y, [x, *weights], g)
    assert torch.equal(y, ref_y)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bias", [False, True])
def test_cast_linear_is_the_autocast_linear_without_the_kept_copy(bias):
    """_CastLinear = F.linear on weights cast outside (what autocast does), bit for bit, forward and backward, and
    keeps the float32 weight for the backward, not its bf16 cast."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8).bfloat16().requires_grad_()
    weight = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _CastLinear.apply(x, weight, b, torch.bfloat16)
    assert not [t for t in saved if t.dtype == torch.bfloat16 and t.shape == weight.shape]
    ref = torch.nn.functional.linear(x, weight.bfloat16(), None if b is None else b.bfloat16())
    g = torch.randn_like(y)
    inputs = [x, weight] + ([b] if bias else [])
    got, want = torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)
    assert torch.equal(y, ref)
    assert all(a.dtype == c.dtype and torch.equal(a, c) for a, c in zip(got, want))


def test_autocast_model_keeps_no_weight_copies_for_the_backward():
    """A whole model's forward under autocast with the lean layers: no bf16 copy of any weight matrix is saved for
    the backward (transformers' own modules save one per linear), and the gradients stay those of autocast."""
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model("posttrain/tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    def kept_copies():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return [t for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes], loss.detach(), grads

    plain, loss, grads = kept_copies()
    assert plain  # autocast keeps the casts
    apply_lean_layers(model)
    lean, lean_loss, lean_grads = kept_copies()
    assert lean == [] and torch.allclose(lean_loss, loss, rtol=1e-2)
    for key in grads:
        assert lean_grads[key].dtype == torch.float32
        assert (lean_grads[key] - grads[key]).norm() <= 0.05 * grads[key].norm(), key


def _weight_casts(model, ids, forwards: int) -> int:
    """How many float32 -> bfloat16 copies of a weight-shaped tensor `forwards` no-grad forwards make inside one
    autocast block (the dispatch mode sees the casts autocast issues; cached ones are not issued again)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    casts = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                    and tuple(args[0].shape) in shapes:
                casts.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Count():
        outs = [model(input_ids=ids).logits for _ in range(forwards)]
    return len(casts), outs


def test_no_grad_forward_is_the_modules_own_and_reuses_autocast_casts():
    """Without gradients (rollouts, reference passes) the patched modules run their own forward: the same outputs,
    and under one autocast block every weight is cast once for all forwards (the decode steps of a rollout), not
    once per forward as the explicit casts of the gradient path would."""
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model("posttrain/tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    plain_casts, plain = _weight_casts(model, ids, 3)
    apply_lean_layers(model)
    lean_casts, lean = _weight_casts(model, ids, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, lean))
    assert plain_casts > 0 and lean_casts == plain_casts
    one_casts, _ = _weight_casts(model, ids, 1)
    assert lean_casts == one_casts  # three forwards, the casts of one


def test_frozen_weights_and_unrecognised_modules():
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model("posttrain/tiny")
    mlp = model.model.layers[0].mlp
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=True)  # biased: left
    counts = apply_lean_layers(model)
    assert counts["swiglu_mlp"] == model.config.num_hidden_layers - 1
    assert "forward" not in vars(mlp)
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()  # frozen weights: no gradient asked of them
    assert model.model.embed_tokens.weight.grad is not None


def test_trainer_option(tmp_path):
    from posttrain import SFTConfig, SFTTrainer
    from posttrain.data.arith import load_builtin_dataset

    data = load_builtin_dataset("posttrain/arith-sft", split="train").select(range(2))
    losses = {}
    for lean in (True, False):
        args = SFTConfig(output_dir=str(tmp_path / str(lean)), max_steps=1, per_device_train_batch_size=2,
                         report_to="none", lean_layers=lean, seed=0, logging_steps=1, save_strategy="no")
        trainer = SFTTrainer(model="posttrain/tiny", args=args, train_dataset=copy.deepcopy(data))
        patched = "forward" in vars(trainer.model.model.norm)
        assert patched is lean
        trainer.train()
        losses[lean] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
