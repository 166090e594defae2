"""The one logits→logps path: target positions, head-on-targets forward, log-probs, entropy."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models.logprobs import (IGNORE_INDEX, entropy_from_logits, forward_target_logits, selective_logps,
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


def test_selective_logps_matches_log_softmax_and_chunks():
    logits = torch.randn(50, 13)
    targets = torch.randint(0, 13, (50,))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(selective_logps(logits, targets, chunk_size=7), expected, atol=1e-6)
    expected_t = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(selective_logps(logits, targets, temperature=0.7), expected_t, atol=1e-6)


def test_entropy_limits():
    uniform = torch.zeros(2, 8)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((2,), torch.log(torch.tensor(8.0))))
    peaked = torch.tensor([[100.0, 0, 0, 0]])
    assert entropy_from_logits(peaked).item() < 1e-6
