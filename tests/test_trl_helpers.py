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


# ---- chat-template helpers -------------------------------------------------------------------------------------
def _tok(template: str | None = "tiny"):
    tok = loading.load_tokenizer(MODEL)
    if template == "tools":
        tok.chat_template = open(loading.builtin_chat_template_path("posttrain/chatml-tools")).read()
    elif template != "tiny":
        tok.chat_template = template
    return tok


_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "4+4?"},
         {"role": "assistant", "content": "It is 8."}]
_TOOL_CHAT = [{"role": "user", "content": "Double 2."},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "double", "arguments": {"x": 2}}}]},
              {"role": "tool", "name": "double", "content": "4"}, {"role": "assistant", "content": "4."}]
_DROPS_TOOLS = ("{%- for m in messages %}{%- if m['role'] != 'tool' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{%- endif %}{%- endfor %}")


def test_supports_tool_calling():
    from posttrain import supports_tool_calling

    assert supports_tool_calling(_tok("tools")) is True
    assert supports_tool_calling(_tok()) is False  # plain ChatML renders no tool_calls
    assert supports_tool_calling(_tok(_DROPS_TOOLS)) is False
    tok = _tok()
    tok.chat_template = None
    assert supports_tool_calling(tok) is False


@pytest.mark.parametrize("kind,chat", [("tiny", _CHAT), ("tools", _TOOL_CHAT)])
def test_get_training_chat_template_marks_the_assistant_turns(kind, chat):
    from posttrain import get_training_chat_template
    from posttrain.data.tokenize import tokenize_messages

    tok = _tok(kind)
    template = get_training_chat_template(tok)
    assert "{% generation" in template or "{%- generation" in template
    for prompt in (False, True):  # the same text as the original template
        assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt, chat_template=template)
                == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt))
    out = tok.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    by_turns = tokenize_messages(tok, chat, assistant_only=True)  # the rule SFT's assistant_only_loss uses
    assert list(out["input_ids"]) == by_turns["input_ids"]
    assert list(out["assistant_masks"]) == by_turns["completion_mask"]
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained.endswith("It is 8.<|im_end|>" if kind == "tiny" else "4.<|im_end|>")
    # with the markers in place, there is nothing more to do; TRL's older tokenizer= still works
    tok.chat_template = template
    assert get_training_chat_template(tokenizer=tok) is None


def test_get_training_chat_template_refuses_what_it_cannot_mark():
    from posttrain.chat_template_utils import get_training_chat_template  # TRL's module path

    # earlier assistant turns are rendered empty: no rendering up to a turn is a prefix of the whole
    rewrites = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{%- if m['role'] == 'assistant' and not loop.last %}{%- else %}{{ m['content'] }}{%- endif %}"
                "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    with pytest.raises(ValueError, match="turn by turn"):
        get_training_chat_template(_tok(rewrites))
    tok = _tok()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        get_training_chat_template(tok)


def test_add_response_schema_parses_hermes_tool_calls():
    from posttrain import add_response_schema
    from posttrain.rollout.tools import parse_tool_calls

    tok = add_response_schema(_tok("tools"))
    text = '<think>double it</think>Sure.\n<tool_call>{"name": "double", "arguments": {"x": 2}}</tool_call><|im_end|>'
    assert tok.parse_response(text, prefix="") == {
        "role": "assistant", "reasoning_content": "double it", "content": "Sure.",
        "tool_calls": [{"type": "function", "function": {"name": "double", "arguments": {"x": 2}}}]}
    assert tok.parse_response("Just 4.<|im_end|>", prefix="") == {"role": "assistant", "content": "Just 4."}
    calls = parse_tool_calls(text, tok)  # the agentic rollouts read it
    assert [(c.name, c.arguments, c.error) for c in calls] == [("double", {"x": 2}, None)]
    with pytest.raises(ValueError, match="Unrecognized chat template"):
        add_response_schema(_tok())
    native = _tok()
    native.response_template = {"fields": {}}
    assert add_response_schema(native).response_template == {"fields": {}}  # a shipped one is kept


def test_template_helpers_agree_with_trl():
    """TRL's own model templates (read from its package): tool support as TRL decides it, and for Qwen 2.5 the
    same parsed message from our response template as from TRL's."""
    import os

    trl = pytest.importorskip("trl")
    import trl.chat_template_utils as trl_templates

    folder = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    from posttrain.data import template_support

    for name in ("qwen2_5", "qwen3", "llama3", "llama3_1", "gemma", "phi3", "cohere2", "glm4moe"):
        tok = _tok(open(os.path.join(folder, f"{name}.jinja")).read())
        tok.bos_token = "<|im_start|>"
        assert template_support.supports_tool_calling(tok) == trl_templates.supports_tool_calling(tok), name
    ours = template_support.add_response_schema(_tok(open(os.path.join(folder, "qwen2_5.jinja")).read()))
    theirs = trl_templates.add_response_schema(_tok(open(os.path.join(folder, "qwen2_5.jinja")).read()))
    for text in ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", '
                 '"arguments": {}}\n</tool_call><|im_end|>', "Plain answer.<|im_end|>",
                 '<think>\nhmm\n</think>\n\nok<|im_end|>'):
        assert ours.parse_response(text, prefix="") == theirs.parse_response(text, prefix=""), text
