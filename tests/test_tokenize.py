"""Golden token masks: standard text, prompt-completion, and assistant-only masks with and without
generation markers in the chat template (the two must agree)."""

import pytest
from transformers import AutoTokenizer

from posttrain.data import tokenize
from posttrain.models.builtin import builtin_tokenizer_path

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "#### 8"},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(builtin_tokenizer_path())


@pytest.fixture(scope="module")
def training_tok():
    import os

    t = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    path = os.path.join(os.path.dirname(builtin_tokenizer_path()), "chat_templates", "chatml_training.jinja")
    t.chat_template = open(path).read()
    return t


def _trained_text(tok, out):
    return tok.decode([i for i, m in zip(out["input_ids"], out["completion_mask"]) if m])


def test_text_gets_eos_once(tok):
    out = tokenize.tokenize_text(tok, "1 + 1 = 2", tok.eos_token)
    assert out["input_ids"][-1] == tok.eos_token_id and all(out["completion_mask"])
    again = tokenize.tokenize_text(tok, "1 + 1 = 2" + tok.eos_token, tok.eos_token)
    assert again["input_ids"] == out["input_ids"]


def test_prompt_completion_standard(tok):
    out = tokenize.tokenize_prompt_completion(tok, "Question: 1 + 1?\nAnswer:", " 2", tok.eos_token)
    assert _trained_text(tok, out) == " 2<|im_end|>"
    assert tok.decode(out["input_ids"]) == "Question: 1 + 1?\nAnswer: 2<|im_end|>"
    full = tokenize.tokenize_prompt_completion(tok, "Q", " 2", tok.eos_token, completion_only=False)
    assert all(full["completion_mask"])


def test_prompt_completion_conversational(tok):
    out = tokenize.tokenize_prompt_completion(tok, CONVERSATION[1:2], CONVERSATION[2:3], tok.eos_token)
    assert _trained_text(tok, out) == "2 + 3 = 5\n#### 5<|im_end|>\n"
    assert tok.decode(out["input_ids"]).startswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_mask_golden_without_markers(tok):
    assert not tokenize.has_generation_markers(tok)
    out = tokenize.tokenize_messages(tok, CONVERSATION, assistant_only=True)
    spans = []
    current = []
    for i, m in zip(out["input_ids"], out["completion_mask"]):
        if m:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert spans == ["2 + 3 = 5\n#### 5<|im_end|>", "#### 8<|im_end|>"]


def test_assistant_mask_with_markers_equals_turn_by_turn(tok, training_tok):
    assert tokenize.has_generation_markers(training_tok)
    plain = tokenize.tokenize_messages(tok, CONVERSATION, assistant_only=True)
    marked = tokenize.tokenize_messages(training_tok, CONVERSATION, assistant_only=True)
    assert plain == marked


def test_whole_conversation_when_not_assistant_only(tok):
    out = tokenize.tokenize_messages(tok, CONVERSATION)
    assert all(out["completion_mask"]) and tok.decode(out["input_ids"]).count("<|im_start|>") == 5


def test_no_chat_template_is_a_clear_error(tok):
    bare = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template_path"):
        tokenize.tokenize_messages(bare, CONVERSATION)


def test_truncate_modes():
    ex = {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}
    assert tokenize.truncate(ex, 3) == {"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}
    assert tokenize.truncate(ex, 3, "keep_end") == {"input_ids": [2, 3, 4], "completion_mask": [0, 1, 1]}
