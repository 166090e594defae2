"""Dataset type/format detection, ShareGPT conversion, prompt extraction, unpairing, error messages."""

import pytest

from posttrain.data import formats


@pytest.mark.parametrize("columns,expected", [
    (["text"], "language_modeling"),
    (["messages"], "language_modeling"),
    (["prompt"], "prompt_only"),
    (["prompt", "completion"], "prompt_completion"),
    (["prompt", "chosen", "rejected"], "preference"),
    (["chosen", "rejected"], "preference_implicit"),
    (["prompt", "completion", "label"], "unpaired_preference"),
    (["foo"], None),
])
def test_detect_type(columns, expected):
    assert formats.detect_type(columns) == expected


def test_detect_custom_text_field():
    assert formats.detect_type(["content"], text_field="content") == "language_modeling"


def test_is_conversational():
    assert formats.is_conversational({"messages": [{"role": "user", "content": "hi"}]})
    assert formats.is_conversational({"prompt": [{"role": "user", "content": "hi"}], "completion": []})
    assert not formats.is_conversational({"text": "hi"})
    assert not formats.is_conversational({"prompt": "hi", "completion": "there"})


def test_sharegpt_conversion():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    assert formats.is_sharegpt(row)
    assert formats.sharegpt_to_messages(row) == {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match="Unknown ShareGPT speaker"):
        formats.sharegpt_to_messages({"conversations": [{"from": "robot", "value": "x"}]})


def test_extract_prompt_standard_backs_off_to_word_boundary():
    out = formats.extract_prompt({"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five"})
    assert out == {"prompt": "Q: 2+2? A:", "chosen": " four", "rejected": " five"}
    out = formats.extract_prompt({"chosen": "A: 4 - 1 = 3", "rejected": "A: 4 + 1 = 5"})
    assert out == {"prompt": "A: 4", "chosen": " - 1 = 3", "rejected": " + 1 = 5"}


def test_extract_prompt_conversational():
    user = {"role": "user", "content": "2+2?"}
    out = formats.extract_prompt({"chosen": [user, {"role": "assistant", "content": "4"}],
                                  "rejected": [user, {"role": "assistant", "content": "5"}]})
    assert out["prompt"] == [user]
    assert out["chosen"] == [{"role": "assistant", "content": "4"}]


def test_unpair():
    out = formats.unpair_preference({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]})
    assert out == {"prompt": ["p", "p"], "completion": ["c", "r"], "label": [True, False]}


def test_require_type_error_names_expected_columns_and_suggests():
    with pytest.raises(ValueError) as err:
        formats.require_type(["promt", "completion"], ("prompt_completion", "language_modeling"), "SFTTrainer")
    message = str(err.value)
    assert "'prompt' + 'completion'" in message and "'text'" in message and "'promt' → 'prompt'" in message
