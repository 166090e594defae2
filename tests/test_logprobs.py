"""The one logits→logps path: target positions, head-on-targets forward, log-probs, entropy."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models.logprobs import (IGNORE_INDEX, forward_target_logits, selective_logps,
                                       target_positions)


def _model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def test_target_positions_union_over_rows():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]])
    # position t predicts labels[:, t+1]: row0 needs t=1,2; row1 needs t=0
    assert target_positions(labels).tolist() == [0, 1, 2]


def test_forward_target_logits_matches_full_forward():
    model = _model()
    input_ids = torch.randint(0, 97, (3, 10))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[2, 8:] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    logits, targets, _, _ = forward_target_logits(model, input_ids, labels, attention_mask)
    full = model(input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    shifted = labels[:, 1:]
    assert torch.allclose(logits, full[shifted != IGNORE_INDEX], atol=1e-5)
    assert torch.equal(targets, shifted[shifted != IGNORE_INDEX])


def test_head_runs_on_trained_rows_only_with_the_same_values_and_gradients(monkeypatch):
    """Rows with different prompt lengths: the head sees N trained rows, not B × (union of positions)."""
    import posttrain.models.logprobs as logprobs

    model = _model().train()
    input_ids = torch.randint(0, 97, (3, 12))
    labels = input_ids.clone()
    labels[0, :3] = labels[1, :9] = labels[2, :6] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX
    seen_rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: seen_rows.append(a[0].reshape(-1, 32).shape[0]))
    logits, targets, valid, _ = forward_target_logits(model, input_ids, labels)
    hook.remove()
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert logits.shape[0] == n and seen_rows == [0, n]  # the in-model call gets an empty slice
    logits.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(logprobs, "output_head", lambda m: None)  # the logits_to_keep path
    logits2, targets2, valid2, _ = forward_target_logits(model, input_ids, labels)
    logits2.square().sum().backward()
    assert torch.allclose(logits, logits2, atol=1e-6) and torch.equal(targets, targets2) and torch.equal(valid, valid2)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_models_that_post_process_logits_take_the_plain_path():
    from posttrain.models.logprobs import output_head

    model = _model()
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert output_head(model) is None


def test_selective_logps_matches_log_softmax_and_chunks():
    logits = torch.randn(50, 13)
    targets = torch.randint(0, 13, (50,))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(selective_logps(logits, targets, chunk_size=7), expected, atol=1e-6)
    expected_t = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(selective_logps(logits, targets, temperature=0.7), expected_t, atol=1e-6)


def _entropy(logits):
    from posttrain.models.logprobs import token_logps

    return token_logps(logits, torch.zeros(logits.shape[0], dtype=torch.long), with_entropy=True)["entropy"]


def test_entropy_limits():
    uniform = torch.zeros(2, 8)
    assert torch.allclose(_entropy(uniform), torch.full((2,), torch.log(torch.tensor(8.0))))
    peaked = torch.tensor([[100.0, 0, 0, 0]])
    assert _entropy(peaked).item() < 1e-6


def test_token_logps_gradient_entropy_and_mean_match_autograd_at_a_temperature():
    from posttrain.models.logprobs import token_logps

    torch.manual_seed(0)
    logits = torch.randn(37, 101, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    upstream = torch.randn(37)
    out = token_logps(logits, targets, temperature=0.7, with_entropy=True, with_metrics=True, chunk_size=10)  # 4 chunks
    (out["logps"] * upstream).sum().backward()
    fused_grad, logits.grad = logits.grad.clone(), None
    z = logits / 0.7
    expected = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * upstream).sum().backward()
    assert torch.allclose(out["logps"], expected, atol=1e-5)
    assert torch.allclose(fused_grad, logits.grad, atol=1e-6)
    assert torch.allclose(out["entropy"], -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1), atol=1e-5)
    assert torch.allclose(out["logits_mean"], logits.detach().mean(-1), atol=1e-6)
    assert not out["entropy"].requires_grad
    assert set(token_logps(logits, targets)) == {"logps"}  # reference passes compute nothing else
    with torch.no_grad():  # the no-grad path (reference passes) gives the same values
        again = token_logps(logits, targets, temperature=0.7, with_entropy=True, with_metrics=True)
    assert torch.allclose(again["logps"], out["logps"]) and torch.allclose(again["entropy"], out["entropy"])
