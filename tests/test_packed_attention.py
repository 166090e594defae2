"""Packed attention (models/packed_attention.py): one causal SDPA call per document of a packed row gives the
logits and gradients of the documents run alone; padded batches fall through to transformers' SDPA; padded
log-prob batches (right- or left-padded) run as one row with the same log-probs and gradients; SFT with
padding_free (its default) trains to the padded run's losses and saves a model that loads anywhere."""

import types

import pytest
import torch

from posttrain.models import packed_attention
from posttrain.models.packed_attention import document_bounds, use_packed_attention


def test_document_bounds():
    assert document_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [0, 3, 5, 6]
    assert document_bounds(torch.tensor([[0, 1, 2, 3]])) is None


@pytest.mark.parametrize("name", ["posttrain/tiny", "posttrain/tiny-llama"])  # tiny-llama: grouped-query heads
def test_packed_row_equals_documents_alone(name, monkeypatch):
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model(name).double()
    lengths = [5, 9, 3]
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    alone = torch.cat([model(input_ids=part, use_cache=False).logits for part in ids.split(lengths, dim=1)], 1)
    dense = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # transformers' block mask
    dense_grads = torch.autograd.grad(dense.square().sum(), list(model.parameters()))
    assert use_packed_attention(model)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "F", types.SimpleNamespace(scaled_dot_product_attention=counting))
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert calls == [True] * (len(lengths) * model.config.num_hidden_layers)
    assert torch.allclose(packed, alone, atol=1e-10)
    grads = torch.autograd.grad(packed.square().sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(grads, dense_grads))
    calls.clear()  # a padded batch of two rows: transformers' SDPA with its mask, not the per-document path
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    padded = model(input_ids=ids[:, :16].view(2, 8), attention_mask=mask, use_cache=False).logits
    assert calls == [] and torch.isfinite(padded).all()


@pytest.mark.parametrize("side", ["right", "left"])  # DPO rows are right-padded, GRPO prompts left-padded
def test_padded_log_prob_batch_runs_packed(side):
    from posttrain.models.loading import load_pretrained_model
    from posttrain.models.logprobs import completion_logps, positions_from_mask

    model = load_pretrained_model("posttrain/tiny-llama").double()
    lengths = [7, 12, 4]
    width = max(lengths)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    ids = torch.randint(1, model.config.vocab_size, (3, width)) * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[mask.cumsum(1) <= 3] = -100  # a 3-token prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "position_ids": positions_from_mask(mask)}

    def logps_and_grads():
        out = completion_logps(model, batch)
        return out["logps"], torch.autograd.grad(out["logps"].sum(), list(model.parameters()))

    plain, plain_grads = logps_and_grads()
    assert use_packed_attention(model)
    rows = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    packed, packed_grads = logps_and_grads()
    assert rows == [(1, sum(lengths))]  # one row, no padding
    assert torch.allclose(packed, plain, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(packed_grads, plain_grads))


def test_sft_padding_free_uses_it(tmp_path):
    import transformers

    from posttrain import SFTConfig, SFTTrainer
    from posttrain.data.arith import load_builtin_dataset

    data = load_builtin_dataset("posttrain/arith-sft", split="train").select(range(4))
    losses = {}
    for padding_free in (False, True):  # the packed trainer last: its saved model is checked
        args = SFTConfig(output_dir=str(tmp_path / str(padding_free)), max_steps=1, per_device_train_batch_size=4,
                         report_to="none", padding_free=padding_free, seed=0, logging_steps=1,
                         save_strategy="no")
        trainer = SFTTrainer(model="posttrain/tiny", args=args, train_dataset=data)
        assert trainer.model.config._attn_implementation == packed_attention.NAME
        trainer.train()
        losses[padding_free] = trainer.state.log_history[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    trainer_dir = str(tmp_path / "saved")
    SFTTrainer.save_model(trainer, trainer_dir)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(trainer_dir)
    assert loaded.config._attn_implementation == "sdpa"
