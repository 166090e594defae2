"""Collator: golden batches for padded, packed and padding-free modes, and document isolation in a real model.

The model tests pin two facts the collator relies on (transformers 5.x): restarting position_ids with no attention
mask and `use_cache=False` give every packed document exactly the log-probs it has alone; with the default
`config.use_cache=True` (or with a 2-D attention_mask) the documents silently attend to each other.
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.data.collators import DataCollatorForLanguageModeling

X = -100
EXAMPLES = [
    {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
    {"input_ids": [8, 9], "completion_mask": [0, 1]},
]
PACKED = [
    {"input_ids": [1, 2, 3, 4, 5], "completion_mask": [0, 1, 1, 1, 1], "seq_lengths": [2, 3]},
    {"input_ids": [6, 7, 8], "completion_mask": [1, 1, 0], "seq_lengths": [1, 2]},
]


VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")  # padding-free extras


def _lists(batch):
    return {k: v.tolist() for k, v in batch.items() if k not in VARLEN}


def test_padded_golden():
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(EXAMPLES)
    assert list(batch) == ["input_ids", "attention_mask", "labels"]
    assert _lists(batch) == {"input_ids": [[5, 6, 7], [8, 9, 0]],
                             "attention_mask": [[1, 1, 1], [1, 1, 0]],
                             "labels": [[X, 6, 7], [X, 9, X]]}
    assert all(v.dtype == torch.long for v in batch.values())


def test_padded_without_completion_mask_or_completion_only_loss():
    plain = [{"input_ids": ex["input_ids"]} for ex in EXAMPLES]
    expected = [[5, 6, 7], [8, 9, X]]  # every real token is a target; padding never is
    assert DataCollatorForLanguageModeling(0)(plain)["labels"].tolist() == expected
    full = DataCollatorForLanguageModeling(0, completion_only_loss=False)(EXAMPLES)
    assert full["labels"].tolist() == expected


def test_padded_pad_to_multiple_of():
    batch = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=4)(EXAMPLES)
    assert _lists(batch) == {"input_ids": [[5, 6, 7, 0], [8, 9, 0, 0]],
                             "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0]],
                             "labels": [[X, 6, 7, X], [X, 9, X, X]]}


def test_padded_packed_rows_golden():
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(PACKED)
    assert list(batch) == ["input_ids", "position_ids", "labels"]  # no attention_mask, even with padding
    assert _lists(batch) == {"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]],
                             # the padding tail is its own document: positions restart there too
                             "position_ids": [[0, 1, 0, 1, 2], [0, 0, 1, 0, 1]],
                             "labels": [[X, 2, X, 4, 5], [X, X, X, X, X]]}


def test_padded_packed_rows_without_padding():
    batch = DataCollatorForLanguageModeling(pad_token_id=0, completion_only_loss=False)(PACKED[:1])
    assert _lists(batch) == {"input_ids": [[1, 2, 3, 4, 5]], "position_ids": [[0, 1, 0, 1, 2]],
                             "labels": [[X, 2, X, 4, 5]]}


def test_padding_free_golden():
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(EXAMPLES)
    assert list(batch) == ["input_ids", "position_ids", "labels", *VARLEN]
    assert _lists(batch) == {"input_ids": [[5, 6, 7, 8, 9]], "position_ids": [[0, 1, 2, 0, 1]],
                             "labels": [[X, 6, 7, X, 9]]}


def test_padding_free_packed_rows_and_full_loss():
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, completion_only_loss=False)
    batch = collator(PACKED + [{"input_ids": [9, 10]}])
    assert _lists(batch) == {"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]],
                             "position_ids": [[0, 1, 0, 1, 2, 0, 0, 1, 0, 1]],
                             "labels": [[X, 2, X, 4, 5, X, X, 8, X, 10]]}


def test_padding_free_pad_to_multiple_of():
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=4)(EXAMPLES)
    assert _lists(batch) == {"input_ids": [[5, 6, 7, 8, 9, 0, 0, 0]],
                             "position_ids": [[0, 1, 2, 0, 1, 0, 1, 2]],  # padding = a separate document
                             "labels": [[X, 6, 7, X, 9, X, X, X]]}


@pytest.mark.parametrize("padding_free", [False, True])
def test_tensor_examples_match_lists(padding_free):
    as_tensors = [{k: torch.tensor(v) for k, v in ex.items()} for ex in PACKED]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    assert _lists(collator(as_tensors)) == _lists(collator(PACKED))


@pytest.mark.parametrize("example, match", [
    ({"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}, "sum to the row length"),
    ({"input_ids": [[1, 2]]}, "one flat sequence"),
    ({"input_ids": [1, 2], "completion_mask": [1]}, "completion_mask has 1"),
])
def test_bad_examples(example, match):
    with pytest.raises(ValueError, match=match):
        DataCollatorForLanguageModeling(pad_token_id=0)([example])


def test_bad_settings():
    with pytest.raises(ValueError, match="pad_token_id"):
        DataCollatorForLanguageModeling(pad_token_id=None)
    with pytest.raises(ValueError, match="return_tensors"):
        DataCollatorForLanguageModeling(pad_token_id=0, return_tensors="np")


# --------------------------------------------------------------------------------- isolation in a real model
@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_qwen2(request):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=request.param)
    model = Qwen2ForCausalLM(config).eval()
    assert model.config._attn_implementation == request.param and model.config.use_cache
    return model


DOCS = [[3, 17, 42, 99, 5], [7, 64, 2, 11, 80, 23, 9, 127, 1], [50, 60, 70, 8]]


def _token_logps(logits, input_ids):
    """(N-1,) log-prob of each token given the ones before it in its row."""
    return logits[:-1].log_softmax(-1).gather(-1, input_ids[1:, None])[:, 0]


@torch.no_grad()
def _alone(model):
    return [_token_logps(model(input_ids=torch.tensor([d]), use_cache=False).logits[0], torch.tensor(d))
            for d in DOCS]


def _targets(logits, batch, row=0):
    """Log-probs at the target positions (labels != -100) of one row, split back into documents."""
    logps = _token_logps(logits[row], batch["input_ids"][row])
    got = logps[batch["labels"][row, 1:] != X]
    return list(got.split([len(d) - 1 for d in DOCS]))


@torch.no_grad()
def test_padding_free_documents_are_isolated(tiny_qwen2):
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, completion_only_loss=False)(
        [{"input_ids": d} for d in DOCS])
    logits = tiny_qwen2(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for got, want in zip(_targets(logits, batch), _alone(tiny_qwen2)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_use_cache_pitfall_breaks_isolation(tiny_qwen2):
    """Default config.use_cache=True builds a KV cache, which disables packed-sequence detection."""
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, completion_only_loss=False)(
        [{"input_ids": d} for d in DOCS])
    logits = tiny_qwen2(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    got, want = _targets(logits, batch), _alone(tiny_qwen2)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)  # the first document sees nothing earlier
    for later in (1, 2):
        assert (got[later] - want[later]).abs().max() > 1e-3


@torch.no_grad()
def test_padded_packed_rows_are_isolated_without_attention_mask(tiny_qwen2):
    rows = [{"input_ids": DOCS[0] + DOCS[1], "seq_lengths": [len(DOCS[0]), len(DOCS[1])]},
            {"input_ids": DOCS[2], "seq_lengths": [len(DOCS[2])]}]  # padded by 10 tokens
    batch = DataCollatorForLanguageModeling(pad_token_id=0, completion_only_loss=False)(rows)
    assert "attention_mask" not in batch
    logits = tiny_qwen2(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    alone = _alone(tiny_qwen2)
    row0 = _token_logps(logits[0], batch["input_ids"][0])[batch["labels"][0, 1:] != X]
    row1 = _token_logps(logits[1], batch["input_ids"][1])[batch["labels"][1, 1:] != X]
    torch.testing.assert_close(row0, torch.cat(alone[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(row1, alone[2], atol=1e-5, rtol=0)
    # why the collator omits the mask: given one, transformers skips packed detection and documents mix
    mixed = tiny_qwen2(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                       attention_mask=torch.ones_like(batch["input_ids"][:1]), use_cache=False).logits
    second = _token_logps(mixed[0], batch["input_ids"][0])[len(DOCS[0]):]
    assert (second - alone[1]).abs().max() > 1e-3
