"""Shared-prefix forward (`models/shared_prefix.py`): a batch whose rows repeat a few prompts runs each prompt once,
with the plain forward's log-probs, entropies and gradients; it steps aside when nothing is shared or it cannot
run; a GRPO run gives the same losses with and without it."""

import math

import pytest
import torch

from posttrain.configs.grpo import GRPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.models import loading, logprobs, shared_prefix
from posttrain.models.logprobs import completion_logps
from posttrain.trainers.grpo import GRPOTrainer

P, C, G = 12, 9, 3


def _batch(prompt_lengths=(7, 12), vocab=4000):
    """G left-padded copies of each prompt followed by completions of different lengths (right-padded)."""
    prompts = [torch.randint(3, vocab, (n,)) for n in prompt_lengths]
    rows = len(prompts) * G
    ids = torch.zeros(rows, P + C, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(rows):
        prompt = prompts[i // G]
        ids[i, P - len(prompt):P], mask[i, P - len(prompt):P] = prompt, 1
        n = 1 + i % C
        ids[i, P:P + n], mask[i, P:P + n] = torch.randint(3, vocab, (n,)), 1
    labels = ids.clone()
    labels[:, :P] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels}


def _run(model, batch, prefix):
    model.zero_grad()
    out = completion_logps(model, batch, temperature=0.7, with_entropy=True, shared_prefix=prefix)
    (out["logps"].sum() + 0.1 * out["logps"].pow(2).sum()).backward()
    return out["logps"].detach(), out["entropy"], {n: p.grad.clone() for n, p in model.named_parameters()}


def _forward_rows(model):
    """Record the number of rows and columns of every forward call of `model`."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)),
                                             with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("name", ["posttrain/tiny", "posttrain/tiny-llama"])
def test_same_logps_entropy_and_gradients_as_the_plain_forward(name):
    model = loading.load_pretrained_model(name)
    batch = _batch()
    plain, shared = _run(model, batch, 0), _run(model, batch, P)
    assert torch.allclose(plain[0], shared[0], atol=1e-5)
    assert torch.allclose(plain[1], shared[1], atol=1e-5)
    for key, grad in plain[2].items():
        assert torch.allclose(grad, shared[2][key], atol=1e-5, rtol=1e-4), key


def test_prompts_run_once_and_no_loss_logits_are_lost():
    model = loading.load_pretrained_model("posttrain/tiny")
    batch = _batch()
    calls, handle = _forward_rows(model)
    with torch.no_grad():
        out = completion_logps(model, batch, shared_prefix=P)
    handle.remove()
    # the 2 distinct prompts (all but the last prompt column), then every row's last prompt column + completion
    assert calls == [(2, P - 1), (2 * G, C + 1)]
    assert int(out["mask"].sum()) == int((batch["labels"] != -100).sum())


def test_steps_aside_when_nothing_is_shared_or_it_cannot_run():
    model = loading.load_pretrained_model("posttrain/tiny")
    distinct = _batch(prompt_lengths=(5, 6, 7, 8, 9, 10))
    distinct["input_ids"][:, :P] = torch.arange(distinct["input_ids"].shape[0])[:, None] + 3  # every prompt differs
    calls, handle = _forward_rows(model)
    with torch.no_grad():
        completion_logps(model, distinct, shared_prefix=P)
        model.gradient_checkpointing_enable()
        model.train()
        completion_logps(model, _batch(), shared_prefix=P)
    handle.remove()
    assert [rows for rows, _ in calls] == [6 * G, 2 * G]  # one plain forward each
    assert shared_prefix.forward_shared_prefix(model, distinct["input_ids"], None, None, P) is None


def test_grpo_losses_equal_with_and_without_sharing(tmp_path, monkeypatch):
    def run(tag):
        torch.manual_seed(0)
        args = GRPOConfig(output_dir=str(tmp_path / tag), max_steps=2, per_device_train_batch_size=8,
                          num_generations=4, max_completion_length=10, learning_rate=1e-3, logging_steps=1,
                          report_to="none", save_strategy="no", seed=0, beta=0.05)
        prompts = load_builtin_dataset("posttrain/arith-prompts", split="train[:8]")
        trainer = GRPOTrainer("posttrain/tiny", reward_funcs=lambda completions, **kw: [len(c) / 10.0 for c in
                                                                                        completions],
                              args=args, train_dataset=prompts)
        trainer.train()
        return [(log["loss"], log["kl"]) for log in trainer.state.log_history if "loss" in log]

    _assert_same_logs(run, monkeypatch)


def _assert_same_logs(run, monkeypatch):
    """run("shared") with the shared path, then run("plain") with it switched off: the same (loss, metric) logs."""
    taken = []
    original = logprobs.forward_shared_prefix
    monkeypatch.setattr(logprobs, "forward_shared_prefix",
                        lambda *args, **kwargs: taken.append(1) or original(*args, **kwargs))
    shared = run("shared")
    assert taken  # the shared path was asked for
    monkeypatch.setattr(logprobs, "forward_shared_prefix", lambda *args, **kwargs: None)
    plain = run("plain")
    assert len(shared) == len(plain) == 2
    for (loss_a, metric_a), (loss_b, metric_b) in zip(shared, plain):
        assert math.isclose(loss_a, loss_b, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(metric_a, metric_b, rel_tol=1e-3, abs_tol=1e-5)


def test_dpo_losses_equal_with_and_without_sharing(tmp_path, monkeypatch):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.trainers.dpo import DPOTrainer

    def run(tag):
        torch.manual_seed(0)
        args = DPOConfig(output_dir=str(tmp_path / tag), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0)
        pairs = load_builtin_dataset("posttrain/arith-pref", split="train[:8]")
        trainer = DPOTrainer("posttrain/tiny", args=args, train_dataset=pairs)
        trainer.train()
        return [(log["loss"], log["rewards/margins"]) for log in trainer.state.log_history if "loss" in log]

    _assert_same_logs(run, monkeypatch)
