"""TRL helpers users import besides the trainers (issue 27): `create_reference_model` (trl.models /
trl.experimental.utils) and the chat-template helpers of trl.chat_template_utils (`supports_tool_calling`,
`get_training_chat_template`, `add_response_schema`)."""

import pytest
import torch

from posttrain.models import loading

MODEL = "posttrain/tiny"


# ---- create_reference_model ------------------------------------------------------------------------------------
def test_create_reference_model_is_a_frozen_eval_copy():
    from posttrain import create_reference_model

    model = loading.load_pretrained_model(MODEL)
    model.train()
    ref = create_reference_model(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name


def test_create_reference_model_shares_and_freezes_the_first_layers():
    from posttrain.models.utils import create_reference_model  # TRL's module path

    model = loading.load_pretrained_model(MODEL)
    ref = create_reference_model(model, num_shared_layers=1)
    names = [n for n, _ in model.named_parameters()]
    first = next(i for i, n in enumerate(names) if "model.layers.1" in n)
    assert first > 0 and any("embed" in n for n in names[:first])
    for i, name in enumerate(names):
        shared = model.get_parameter(name).data_ptr() == ref.get_parameter(name).data_ptr()
        assert shared == (i < first), name
        assert model.get_parameter(name).requires_grad == (i >= first), name
        assert not ref.get_parameter(name).requires_grad
    # training the policy leaves the reference where it was (the shared part is frozen, the rest copied)
    before = {n: p.clone() for n, p in ref.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())
    assert not torch.equal(model.get_parameter(names[-1]), ref.get_parameter(names[-1]))


def test_create_reference_model_pattern_and_paths():
    import posttrain.experimental.utils as experimental_utils

    from posttrain.models import create_reference_model

    assert experimental_utils.create_reference_model is create_reference_model
    model = loading.load_pretrained_model(MODEL)
    ref = create_reference_model(model, num_shared_layers=1, pattern="model.layers.{layer}.")
    assert ref.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="no parameter name contains"):
        create_reference_model(loading.load_pretrained_model(MODEL), num_shared_layers=1, pattern="decoder.{layer}")
    with pytest.raises(ValueError, match="known layer names"):
        create_reference_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), num_shared_layers=1)
