"""Turning one example into token ids and a loss mask.

Every function returns {"input_ids": list[int], "completion_mask": list[int]} where completion_mask is 1 on the
tokens that carry a loss. Standard text gets the EOS token appended (once); conversational data goes through the
tokenizer's chat template.

Assistant-only masks: with a template that has `{% generation %}` markers, transformers' assistant mask is used;
without markers the mask is found by rendering the conversation turn by turn (the prefix up to each assistant turn
with the generation prompt, then up to the end of that turn) and checking that each rendering's tokens are a prefix
of the full conversation's — so any template that renders turns in order works, with or without markers.

Not here: dataset-level passes (truncation, filtering, packing: `data/prepare.py`).
"""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    pass


def _ids(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None,
           continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
    """The chat template applied to `messages`, as text.

    tools: a list of tool schemas or functions, or that list as a JSON string (a dataset column of JSON text).
    chat_template_kwargs: extra template variables (a row's `chat_template_kwargs` column, e.g.
    {"enable_thinking": False}); every renderer of a row passes it, so prompt and completion render alike.
    """
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, tools=tool_list(tools),
                                         **(chat_template_kwargs or {}))


def tool_list(tools: Any) -> Any:
    """Tools as the chat template takes them: a JSON string (how a dataset column often stores them) decoded."""
    if isinstance(tools, str):
        import json

        try:
            return json.loads(tools)
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"The 'tools' value is a string but not JSON ({e}): give a list of tool "
                                    "schemas, or that list as JSON text.") from None
    return tools


def require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("Conversational data needs a tokenizer with a chat template, and this one has none. "
                                "Set chat_template_path (a .jinja file or a tokenizer directory) in the config.")


def with_eos(text: str, eos_token: str | None) -> str:
    return text if not eos_token or text.endswith(eos_token) else text + eos_token


def tokenize_text(tokenizer, text: str, eos_token: str | None) -> dict[str, list[int]]:
    """Standard language-modelling text: every token is trained; EOS appended."""
    ids = _ids(tokenizer, with_eos(text, eos_token), add_special_tokens=True)
    return {"input_ids": ids, "completion_mask": [1] * len(ids)}


def tokenize_prompt_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict],
                               eos_token: str | None, completion_only: bool = True,
                               tools: Any = None, chat_template_kwargs: dict | None = None) -> dict[str, list[int]]:
    """Prompt ids followed by completion ids; the mask covers the completion (or everything if not completion_only).

    Prompt and completion are tokenised separately and concatenated — the same ids the model sees when it
    generates the completion after the prompt.
    """
    prompt_ids, (completion_ids,) = tokenize_prompt_and_completions(tokenizer, prompt, [completion], eos_token,
                                                                     tools, chat_template_kwargs=chat_template_kwargs)
    mask_value = 0 if completion_only else 1
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [mask_value] * len(prompt_ids) + [1] * len(completion_ids)}


def tokenize_prompt_and_completions(tokenizer, prompt: str | list[dict], completions: list, eos_token: str | None,
                                    tools: Any = None, joint: bool = False,
                                    chat_template_kwargs: dict | None = None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids, …]) for one prompt and several completions (chosen/rejected, samples).

    joint=True tokenises each prompt + completion as one text and returns empty prompt ids — what a reward model
    needs, since it later scores whole texts tokenised in one piece.

    Standard: the prompt gets the tokenizer's special tokens (e.g. BOS), completions get EOS appended.
    Conversational: the prompt is rendered with the generation prompt (or continuing a final assistant message);
    each completion is the text the template adds after it, so chat-template end-of-turn tokens are included.
    """
    kw = {"tools": tools, "chat_template_kwargs": chat_template_kwargs}
    if joint:
        if isinstance(prompt, list):
            return [], [_ids(tokenizer, render(tokenizer, prompt + c, **kw)) for c in completions]
        return [], [_ids(tokenizer, with_eos(prompt + c, eos_token), add_special_tokens=True) for c in completions]
    if isinstance(prompt, list):
        last_role = prompt[-1]["role"] if prompt else "user"
        prompt_text = render(tokenizer, prompt, add_generation_prompt=last_role in ("user", "tool", "system"),
                             continue_final_message=last_role == "assistant", **kw) if prompt else ""
        out = []
        for completion in completions:
            full_text = render(tokenizer, prompt + completion, **kw)
            if not full_text.startswith(prompt_text):
                raise ChatTemplateError("The chat template renders the prompt differently alone and followed by "
                                        "the completion, so the completion cannot be located.")
            out.append(_ids(tokenizer, full_text[len(prompt_text):]))
        return _ids(tokenizer, prompt_text), out
    prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
    return prompt_ids, [_ids(tokenizer, with_eos(c, eos_token)) for c in completions]


def tokenize_prompt(tokenizer, prompt: str | list[dict], tools: Any = None,
                    chat_template_kwargs: dict | None = None) -> list[int]:
    """The ids a model continues from: standard text as is (with the tokenizer's special tokens), conversational
    prompts rendered with the generation prompt (or continuing a final assistant message)."""
    prompt_ids, _ = tokenize_prompt_and_completions(tokenizer, prompt, [], None, tools,
                                                    chat_template_kwargs=chat_template_kwargs)
    return prompt_ids


def has_generation_markers(tokenizer) -> bool:
    from posttrain.data.template_support import has_generation_markers as template_has_markers

    return template_has_markers(getattr(tokenizer, "chat_template", None))


def tokenize_messages(tokenizer, messages: list[dict], assistant_only: bool = False,
                      tools: Any = None, chat_template_kwargs: dict | None = None) -> dict[str, list[int]]:
    """A whole conversation; with `assistant_only`, only assistant turns (and their end-of-turn token) are trained."""
    kw = {"tools": tools, "chat_template_kwargs": chat_template_kwargs}
    if not assistant_only:
        ids = _ids(tokenizer, render(tokenizer, messages, **kw))
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=tool_list(tools),
                                            return_assistant_tokens_mask=True, **(chat_template_kwargs or {}))
        return {"input_ids": list(out["input_ids"]), "completion_mask": list(out["assistant_masks"])}
    return _assistant_mask_by_turns(tokenizer, messages, kw)


def _assistant_mask_by_turns(tokenizer, messages: list[dict], kw: dict) -> dict[str, list[int]]:
    ids = _ids(tokenizer, render(tokenizer, messages, **kw))
    mask = [0] * len(ids)
    eos_id = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True, **kw))) if i else 0
        end_ids = _ids(tokenizer, render(tokenizer, messages[: i + 1], **kw))
        if ids[: len(end_ids)] != end_ids or start > len(end_ids):
            raise ChatTemplateError("assistant_only_loss: this chat template does not render conversations turn by "
                                    "turn (an earlier rendering is not a prefix of the full one). Use a template with "
                                    "{% generation %} markers via chat_template_path.")
        end = len(end_ids)
        span = ids[start:end]
        if eos_id in span:  # stop after the end-of-turn token: the separator after it belongs to no turn
            end = start + len(span) - span[::-1].index(eos_id)
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "completion_mask": mask}


def truncate(example: dict[str, list], max_length: int, mode: str = "keep_start",
             keys: tuple[str, ...] = ("input_ids", "completion_mask")) -> dict[str, list]:
    if mode == "keep_start":
        return {k: example[k][:max_length] for k in keys}
    return {k: example[k][-max_length:] for k in keys}
