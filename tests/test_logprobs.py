"""The one logits→logps path: target positions, head-on-targets forward, log-probs, entropy, the chunked head
of passes with gradients (values, gradients, when it is chosen, trainers with it on and off)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models.logprobs import IGNORE_INDEX, forward_target_logits, selective_logps, target_positions


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
    assert out["entropy"].requires_grad and not out["logits_mean"].requires_grad  # the entropy bonus differentiates H
    assert set(token_logps(logits, targets)) == {"logps"}  # reference passes compute nothing else
    with torch.no_grad():  # the no-grad path (reference passes) gives the same values
        again = token_logps(logits, targets, temperature=0.7, with_entropy=True, with_metrics=True)
    assert torch.allclose(again["logps"], out["logps"]) and torch.allclose(again["entropy"], out["entropy"])


# ---- the chunked head of passes with gradients ---------------------------------------------------------------------

def _head_and_hidden(kind: str):
    """An LM head and (N, H) hidden states that depend on the parameters the way a model's do: 'untied', 'tied'
    (head weight = input embedding, so it gets gradients from both uses) or 'bias'."""
    torch.manual_seed(0)
    n, hidden_size, vocab = 53, 16, 89
    embed = torch.nn.Embedding(vocab, hidden_size)
    head = torch.nn.Linear(hidden_size, vocab, bias=kind == "bias")
    if kind == "tied":
        head.weight = embed.weight
    mix = torch.nn.Linear(hidden_size, hidden_size)
    ids = torch.randint(0, vocab, (n,))
    return head, (lambda: torch.tanh(mix(embed(ids)))), [embed.weight, mix.weight, *head.parameters()], vocab


@pytest.mark.parametrize("kind", ["untied", "tied", "bias"])
def test_chunked_head_gives_the_same_values_and_gradients(monkeypatch, kind):
    import posttrain.models.logprobs as logprobs
    from posttrain.models.logprobs import token_logps

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ROWS", 16)  # 53 rows: 3 full chunks and a partial one
    head, make_hidden, params, vocab = _head_and_hidden(kind)
    targets = torch.randint(0, vocab, (53,))
    upstream, upstream_entropy = torch.randn(53), torch.randn(53)
    results = {}
    for chunked in (False, True):
        hidden = make_hidden()
        hidden.retain_grad()
        out = token_logps(None, targets, temperature=0.7, with_entropy=True, with_metrics=True, with_log_sum_p2=True,
                          chunk_size=5, hidden=hidden, head=head, chunked_lm_head=chunked)
        (out["logps"] * upstream + out["entropy"] * upstream_entropy).sum().backward()  # entropy bonus: its grad
        results[chunked] = out, hidden.grad.clone(), [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    (plain, plain_hidden_grad, plain_grads), (chunk, chunk_hidden_grad, chunk_grads) = results[False], results[True]
    assert set(chunk) == set(plain) == {"logps", "entropy", "logits_mean", "correct", "log_sum_p2"}
    for key in plain:
        assert torch.allclose(chunk[key].float(), plain[key].float(), atol=1e-6), key
    assert chunk["logps"].requires_grad and chunk["entropy"].requires_grad and not chunk["log_sum_p2"].requires_grad
    assert torch.allclose(chunk_hidden_grad, plain_hidden_grad, atol=1e-6)
    for g_chunk, g_plain in zip(chunk_grads, plain_grads):
        assert torch.allclose(g_chunk, g_plain, atol=1e-6)
    with torch.no_grad():  # and the no-grad path agrees
        again = token_logps(None, targets, temperature=0.7, with_entropy=True, with_log_sum_p2=True,
                            hidden=make_hidden(), head=head)
    assert torch.allclose(again["logps"], plain["logps"], atol=1e-6)
    assert torch.allclose(again["log_sum_p2"], plain["log_sum_p2"], atol=1e-6)


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
def test_completion_logps_chunked_matches_on_a_model(monkeypatch, variant):
    """Through a whole model (tied embeddings, a LoRA-wrapped head): the same per-row outputs and parameter
    gradients, and the head really does run once per chunk forward and once more per chunk in the backward."""
    import posttrain.models.logprobs as logprobs
    from posttrain.models.logprobs import completion_logps, output_head

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ROWS", 8)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=variant == "tied")
    model = Qwen2ForCausalLM(cfg).train()
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], lora_dropout=0.0))
        for name, p in model.named_parameters():  # non-zero B so the adapter's gradients are not trivially zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    input_ids = torch.randint(0, 97, (3, 12))
    labels = input_ids.clone()
    labels[0, :3] = labels[1, :9] = labels[2, :6] = IGNORE_INDEX  # 9 + 3 + 6 = 18 trained rows: 3 chunks
    batch = {"input_ids": input_ids, "labels": labels}
    trained = [p for p in model.parameters() if p.requires_grad]
    calls = []
    hook = output_head(model).register_forward_hook(lambda m, a, out: calls.append(out.shape[-2]))
    results = {}
    for chunked in (False, True):
        calls.clear()
        out = completion_logps(model, batch, temperature=0.7, with_entropy=True, with_metrics=True,
                               with_log_sum_p2=True, chunked_lm_head=chunked)
        forward_calls = list(calls)
        (out["logps"] * torch.linspace(-1, 1, out["logps"].numel()).view_as(out["logps"])).sum().backward()
        results[chunked] = out, [p.grad.clone() for p in trained], forward_calls, calls[len(forward_calls):]
        model.zero_grad()
    hook.remove()
    plain, plain_grads, plain_fwd, plain_bwd = results[False]
    chunk, chunk_grads, chunk_fwd, chunk_bwd = results[True]
    assert plain_fwd == [0, 18] and plain_bwd == []  # in-model call on an empty slice, then all rows at once
    assert chunk_fwd == [0, 8, 8, 2] and chunk_bwd == [2, 8, 8]  # the backward recomputes each chunk, last first
    for key in ("logps", "entropy", "logits_mean", "log_sum_p2"):
        assert torch.allclose(chunk[key], plain[key], atol=1e-6), key
    assert torch.equal(chunk["correct"], plain["correct"]) and torch.equal(chunk["mask"], plain["mask"])
    for g_chunk, g_plain in zip(chunk_grads, plain_grads):  # sums over chunks in another order: float32 rounding
        assert torch.allclose(g_chunk, g_plain, rtol=1e-5, atol=1e-6)


def test_auto_chunks_above_the_threshold_and_follows_the_scoped_setting(monkeypatch):
    import posttrain.models.logprobs as logprobs
    from posttrain.models.logprobs import lm_head_chunking, uses_chunked_head

    head = torch.nn.Linear(4, 100)
    assert not uses_chunked_head("auto", 1000, head)  # 1000 × 100 × 4 B = 400 kB, far below 1 GiB
    assert uses_chunked_head(True, 1, head) and uses_chunked_head("true", 1, head)
    assert not uses_chunked_head(False, 10**9, head) and not uses_chunked_head("false", 10**9, head)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_AUTO_BYTES", 40_000)
    assert uses_chunked_head("auto", 101, head) and not uses_chunked_head("auto", 100, head)
    assert uses_chunked_head(None, 101, head)  # None = the scoped setting, "auto" by default
    with lm_head_chunking(False):
        assert not uses_chunked_head(None, 10**6, head)
        with lm_head_chunking("true"):
            assert uses_chunked_head(None, 1, head)
        assert not uses_chunked_head(None, 10**6, head)
    with pytest.raises(ValueError, match="chunked_lm_head"):
        uses_chunked_head("sometimes", 1, head)
    # the auto choice on a real pass: the head runs again in the backward only when chunked
    calls = []
    head.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    hidden = torch.randn(150, 4, requires_grad=True)
    targets = torch.randint(0, 100, (150,))
    logprobs.token_logps(None, targets, hidden=hidden, head=head)["logps"].sum().backward()
    assert calls == [150, 150]  # 150 rows > 100 at this threshold: one chunk, recomputed in the backward
    calls.clear()
    logprobs.token_logps(None, targets[:50], hidden=hidden[:50], head=head)["logps"].sum().backward()
    assert calls == [50]


def test_config_chunked_lm_head_values(tmp_path):
    from posttrain import SFTConfig

    def config(value):
        return SFTConfig(output_dir=str(tmp_path), report_to="none", chunked_lm_head=value)

    assert SFTConfig(output_dir=str(tmp_path), report_to="none").chunked_lm_head == "auto"
    assert config(True).chunked_lm_head == "true" and config(False).chunked_lm_head == "false"
    assert config("FALSE").chunked_lm_head == "false"
    with pytest.raises(ValueError, match="chunked_lm_head must be auto, true or false"):
        config("yes")


def _trainer_loss(tmp_path, trainer_name, chunked, monkeypatch, **kw):
    import posttrain.models.logprobs as logprobs
    from posttrain.data.arith import load_builtin_dataset

    used = []
    original = logprobs._checkpointed_head_stats
    monkeypatch.setattr(logprobs, "_checkpointed_head_stats", lambda *a: used.append(1) or original(*a))
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ROWS", 16)
    common = dict(output_dir=str(tmp_path / f"{trainer_name}-{chunked}"), max_steps=2, per_device_train_batch_size=4,
                  learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                  chunked_lm_head=chunked, **kw)
    if trainer_name == "sft":
        from posttrain import SFTConfig, SFTTrainer

        trainer = SFTTrainer("posttrain/tiny", args=SFTConfig(max_length=128, **common),
                             train_dataset=load_builtin_dataset("posttrain/arith-sft", None, split="train[:8]"))
    else:
        from posttrain.configs.dpo import DPOConfig
        from posttrain.trainers.dpo import DPOTrainer

        trainer = DPOTrainer("posttrain/tiny", args=DPOConfig(max_length=96, **common),
                             train_dataset=load_builtin_dataset("posttrain/arith-pref", None, split="train[:8]"))
    trainer.train()
    assert bool(used) == chunked
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("trainer_name,kw", [("sft", {}), ("dpo", {"use_weighting": True})])
def test_trainers_give_the_same_loss_with_the_chunked_head(tmp_path, monkeypatch, trainer_name, kw):
    """Two optimizer steps each way: the second step's loss also checks that the gradients agreed."""
    plain = _trainer_loss(tmp_path, trainer_name, False, monkeypatch, **kw)
    chunked = _trainer_loss(tmp_path, trainer_name, True, monkeypatch, **kw)
    assert len(plain) == 2 and chunked == pytest.approx(plain, rel=1e-5)


def test_head_chunk_rows_keep_a_chunk_under_the_byte_budget():
    """Chunks shrink with the vocabulary so one chunk's float32 logits + softmax stay ≤ HEAD_CHUNK_BYTES (256 MiB):
    the chunked pass's memory does not grow with the vocabulary either."""
    from posttrain.models.logprobs import HEAD_CHUNK_BYTES, head_chunk_rows

    rows = {vocab: head_chunk_rows(torch.nn.Linear(8, vocab, bias=False, device="meta"))
            for vocab in (4096, 32768, 131072, 1 << 20)}
    assert rows == {4096: 1024, 32768: 1024, 131072: 256, 1 << 20: 32}
    assert all(r * v * 8 <= HEAD_CHUNK_BYTES for v, r in rows.items())


def test_entropy_gradient_matches_autograd():
    # H(softmax(z/T)) differentiated by the fused backward (∂H/∂z_j = −p_j(log p_j + H)/T) against plain autograd.
    from posttrain.models.logprobs import token_logps

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (6,), generator=g)
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    fused = logits.clone().requires_grad_()
    out = token_logps(fused, targets, temperature=0.7, with_entropy=True)
    (out["entropy"].double() * weights).sum().backward()
    plain = logits.clone().requires_grad_()
    logp = torch.log_softmax(plain / 0.7, -1)
    (-(logp.exp() * logp).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-5, atol=1e-6)
