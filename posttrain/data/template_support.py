"""What a chat template can do, and the additions training needs: TRL's `trl.chat_template_utils` helpers.

- `supports_tool_calling(processing_class)`: renders a user → assistant (a tool call) → tool exchange and checks that
  the call's name, its argument and the tool's answer all reach the text (templates that drop `tool_calls` or
  tool turns, or refuse the roles, are False).
- `is_chat_template_prefix_preserving(processing_class)`: rendering a tool turn and the next generation prompt after
  an assistant tool call leaves the text before them unchanged (what a multi-turn rollout appends to needs).
- `get_training_chat_template(processing_class)`: None when the template already has `{% generation %}` markers
  (and, with tools, is prefix-preserving); else a template that renders exactly the same text with the markers
  around each assistant turn, so transformers' `return_assistant_tokens_mask` gives the assistant-only loss mask.
  TRL ships a hand-edited copy per known model family; here the original template runs unchanged inside a macro
  and each assistant turn is found by rendering the conversation up to it (with the generation prompt) and through
  it — the rule `data/tokenize.py` uses for assistant_only_loss — so any template that renders turn by turn works.
  One that does not (it rewrites earlier turns, e.g. drops earlier reasoning) is refused in one line, as TRL
  refuses a family it has no copy for.
- `add_response_schema(processing_class)`: sets transformers' `response_template` (read by `parse_response`, and by
  the tool-call parser of the agentic rollouts, `rollout/tools.py`) for templates that write ChatML turns with
  Hermes-form calls `<tool_call>{"name": …, "arguments": …}</tool_call>` (Qwen 2.5/3, posttrain/chatml-tools), found
  by rendering a tool call, not by matching the template's text; a tokenizer that ships its own response template
  keeps it; other forms are refused (set `tokenizer.response_template` yourself).

Not here: rendering rows (`data/templates.py`), tokenising and masks (`data/tokenize.py`).
"""

from __future__ import annotations

import json
from typing import Any

from posttrain.errors import UserError

_NAME, _KEY, _VALUE, _RESULT = "probe_tool_7c1f", "probe_key_3a9d", "probe_value_5e2b", "probe_result_9b4e"


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)  # a processor wraps its tokenizer


def _is_processor(processing_class) -> bool:
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def _template_text(processing_class) -> str | None:
    template = getattr(processing_class, "chat_template", None)
    if isinstance(template, dict):  # named variants: the default one is what apply_chat_template uses
        template = template.get("default")
    return template


def _tool_call(arguments: Any) -> list[dict]:
    return [{"type": "function", "function": {"name": _NAME, "arguments": arguments}}]


def _render(processing_class, messages: list[dict], **kwargs: Any) -> str:
    if _is_processor(processing_class):
        from posttrain.data.formats import prepare_multimodal_messages

        messages = prepare_multimodal_messages(messages)
    return processing_class.apply_chat_template(messages, tokenize=False, **kwargs)


def _render_tool_exchange(processing_class, with_result: bool, **kwargs: Any) -> str | None:
    """The probe exchange rendered, or None when the template refuses it. Arguments go in as a mapping, or as
    JSON text for templates that only take that."""
    from jinja2 import TemplateError

    for arguments in ({_KEY: _VALUE}, json.dumps({_KEY: _VALUE})):
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": _tool_call(arguments)}]
        if with_result:
            messages.append({"role": "tool", "name": _NAME, "content": _RESULT})
        try:
            return _render(processing_class, messages, **kwargs)
        except TemplateError:
            return None
        except TypeError:  # a template that cannot take a mapping as arguments: try the JSON text
            continue
    return None


def supports_tool_calling(processing_class) -> bool:
    """True when the chat template renders a whole tool exchange: the call's name and argument and the tool's
    result all appear in the text (TRL's test)."""
    if _template_text(processing_class) is None:
        return False
    text = _render_tool_exchange(processing_class, with_result=True)
    return text is not None and all(s in text for s in (_NAME, _KEY, _VALUE, _RESULT))


def is_chat_template_prefix_preserving(processing_class) -> bool:
    """True when appending a tool turn and the generation prompt after an assistant tool call leaves the text
    before them as it was (the assistant turn up to its end-of-turn token)."""
    before = _render_tool_exchange(processing_class, with_result=False)
    after = _render_tool_exchange(processing_class, with_result=True, add_generation_prompt=True)
    if before is None or after is None:
        return False
    eos = getattr(_tokenizer_of(processing_class), "eos_token", None)
    if eos and eos in before:  # what follows the turn's end token (a newline) may belong to the next turn
        before = before[:before.rindex(eos) + len(eos)]
    return after.startswith(before)


def has_generation_markers(chat_template: str | dict | None) -> bool:
    """The template marks assistant text with `{% generation %}` (any whitespace control)."""
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return bool(chat_template) and any(tag in chat_template for tag in ("{% generation", "{%- generation"))


# The original template runs as a macro; the assistant turns are cut out of its full rendering by the lengths of
# the renderings up to each turn (with the generation prompt) and through it, ending at the turn's last end token.
_WRAPPER = """{%- macro posttrain_original(messages, add_generation_prompt) %}@ORIGINAL@{% endmacro -%}
{%- set posttrain_full = posttrain_original(messages, add_generation_prompt is defined and add_generation_prompt) -%}
{%- set posttrain = namespace(done=0) -%}
{%- for posttrain_message in messages -%}
{%- if posttrain_message['role'] == 'assistant' -%}
{%- set posttrain_head = posttrain_original(messages[:loop.index0], true) if loop.index0 > 0 else '' -%}
{%- set posttrain_turn = posttrain_original(messages[:loop.index], false) -%}
{%- if not posttrain_full.startswith(posttrain_turn) or not posttrain_turn.startswith(posttrain_head)
      or posttrain_head|length < posttrain.done -%}
{{- raise_exception('posttrain training template: this chat template does not render turn by turn') -}}
{%- endif -%}
{%- set posttrain_start = posttrain_head|length -%}
{%- set posttrain_span = posttrain_full[posttrain_start:posttrain_turn|length] -%}
{%- set posttrain_end = posttrain_turn|length -%}
{%- if eos_token is defined and eos_token and eos_token in posttrain_span -%}
{%- set posttrain_end = posttrain_start + posttrain_span.rindex(eos_token) + eos_token|length -%}
{%- endif -%}
{{- posttrain_full[posttrain.done:posttrain_start] -}}
{%- generation -%}{{- posttrain_full[posttrain_start:posttrain_end] -}}{%- endgeneration -%}
{%- set posttrain.done = posttrain_end -%}
{%- endif -%}
{%- endfor -%}
{{- posttrain_full[posttrain.done:] -}}"""


def _probe_conversations(with_tools: bool) -> list[list[dict]]:
    chats = [[{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."},
              {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "It is 8."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
              {"role": "assistant", "content": "Hi."}]]
    if with_tools:
        chats.append([{"role": "user", "content": "Use the tool."},
                      {"role": "assistant", "content": "", "tool_calls": _tool_call({_KEY: _VALUE})},
                      {"role": "tool", "name": _NAME, "content": _RESULT},
                      {"role": "assistant", "content": "Done."}])
    return chats


def _check_training_template(processing_class, template: str, with_tools: bool) -> None:
    """The training template renders every probe the original renders exactly as it does (a probe the original
    refuses, e.g. a system turn, is skipped) and marks each assistant turn."""
    checked = 0
    for messages in _probe_conversations(with_tools):
        try:
            expected = [_render(processing_class, messages, add_generation_prompt=p) for p in (False, True)]
        except Exception:  # the original refuses this conversation: nothing to compare
            continue
        for prompt, text in zip((False, True), expected):
            if _render(processing_class, messages, add_generation_prompt=prompt, chat_template=template) != text:
                raise ValueError("rendering differs")
        out = processing_class.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                   return_dict=True, return_assistant_tokens_mask=True)
        if sum(out["assistant_masks"]) == 0:
            raise ValueError("no assistant tokens marked")
        checked += 1
    if not checked:
        raise ValueError("the template renders none of the probe conversations")


def get_training_chat_template(processing_class=None, tokenizer=None) -> str | None:
    """A chat template for training with assistant-only loss: None when the current one already has
    `{% generation %}` markers (and, where it supports tools, is prefix-preserving); else the same template with the
    markers added (see the module docstring). A template that cannot be made so is a one-line ValueError.
    `tokenizer=` is TRL's older name for processing_class."""
    if tokenizer is not None:
        if processing_class is not None:
            raise TypeError("Pass only processing_class; tokenizer is its older name.")
        processing_class = tokenizer
    if processing_class is None:
        raise TypeError("get_training_chat_template() missing required argument: 'processing_class'")
    template = _template_text(processing_class)
    if template is None:
        raise UserError("The tokenizer has no chat template; set one (chat_template_path=...) first.")
    with_tools = supports_tool_calling(processing_class)
    prefix_ok = not with_tools or is_chat_template_prefix_preserving(processing_class)
    if not prefix_ok:
        raise UserError("The chat template is not prefix-preserving (rendering a tool result changes the text "
                        "before it), so no training template can be derived from it; pass a template that renders "
                        "turn by turn, e.g. chat_template_path='posttrain/chatml-tools'.")
    if has_generation_markers(template):
        return None
    training = _WRAPPER.replace("@ORIGINAL@", template)
    try:
        _check_training_template(processing_class, training, with_tools)
    except Exception as e:  # the template raised (it does not render turn by turn) or renders differently
        raise UserError("The chat template does not render conversations turn by turn (an earlier rendering is not "
                        f"a prefix of the full one: {str(e).splitlines()[0] if str(e) else type(e).__name__}), so "
                        "{% generation %} markers cannot be added; mark the assistant turns in the template "
                        "yourself.") from None
    return training


# transformers' response-template language (>= 5.13): an assistant turn of ChatML with Hermes-form tool calls and
# optional <think> reasoning; the leading \s* keep separators out of the implicit content field.
_HERMES_CHATML_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "content": "json",
                       "repeats": True, "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}


def _writes_hermes_chatml(processing_class) -> bool:
    text = _render_tool_exchange(processing_class, with_result=False)
    if text is None or "<|im_start|>assistant\n" not in text:
        return False
    turn = text[text.rindex("<|im_start|>assistant\n"):]
    if "<tool_call>" not in turn or "</tool_call>" not in turn:
        return False
    body = turn[turn.index("<tool_call>") + len("<tool_call>"):turn.index("</tool_call>")]
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return False
    return isinstance(call, dict) and call.get("name") == _NAME and call.get("arguments") in ({_KEY: _VALUE},
                                                                                             json.dumps({_KEY: _VALUE}))


def add_response_schema(processing_class):
    """Give the tokenizer (a processor's inner one) transformers' `response_template` for its chat template, so
    `tokenizer.parse_response(text, prefix=...)` returns {"role", "content", "reasoning_content", "tool_calls"}.
    Returns processing_class."""
    import transformers
    from packaging.version import Version

    tokenizer = _tokenizer_of(processing_class)
    if getattr(tokenizer, "response_template", None) is not None:
        return processing_class  # the model ships its own
    if Version(transformers.__version__) < Version("5.13.0"):
        raise UserError(f"add_response_schema sets a response_template, which needs transformers >= 5.13 "
                        f"(installed: {transformers.__version__}).")
    if _template_text(processing_class) is None or not _writes_hermes_chatml(processing_class):
        raise UserError("Unrecognized chat template, failed to add response schema: only ChatML templates with "
                        "Hermes-form <tool_call> JSON calls are known; set tokenizer.response_template yourself.")
    import copy

    tokenizer.response_template = copy.deepcopy(_HERMES_CHATML_RESPONSE)
    return processing_class
