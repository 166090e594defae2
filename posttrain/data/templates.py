"""Conversational rows rendered to text with a chat template (TRL's `apply_chat_template` contract), and a chat
template cloned from one tokenizer onto another model + tokenizer (`clone_chat_template`).

`apply_chat_template(example, tokenizer)` keeps the row's keys (except `messages` → `text`) and turns each message
list into the text the template renders: a `prompt` gets the generation prompt (or continues a final assistant
message); `chosen` / `rejected` / `completion` are the text the template adds after that prompt. When a template
renders the prompt differently alone and followed by a completion (DeepSeek-R1 adds a token to the generation
prompt), the prompt is the common prefix of the renderings, as TRL does. A per-row `chat_template_kwargs` mapping
is passed to the template, before the call's own keyword arguments.

Not here: tokenisation and loss masks (`data/tokenize.py`), which the trainers use directly on message lists.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.formats import is_conversational
from posttrain.data.tokenize import require_chat_template
from posttrain.errors import UserError

# The key sets TRL's taxonomy allows in one row (`label` rides along with unpaired preference rows).
_ROW_KEYS = ({"messages"}, {"prompt"}, {"prompt", "completion"}, {"prompt", "chosen", "rejected"},
             {"chosen", "rejected"}, {"prompt", "completion", "label"})
_KNOWN = {"prompt", "chosen", "rejected", "completion", "messages", "label"}


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def apply_chat_template(example: dict[str, Any], processing_class, tools: list | None = None,
                        **template_kwargs: Any) -> dict[str, Any]:
    """One conversational row → the same row as text (see the module docstring). A row whose keys are not one of
    the dataset types is a KeyError, as in TRL; a tokenizer without a chat template a one-line error."""
    keys = {k for k in example if k in _KNOWN}
    if keys not in _ROW_KEYS:
        raise KeyError(f"Invalid keys in the example: {sorted(keys)}; expected one of "
                       f"{[sorted(k) for k in _ROW_KEYS]}.")
    require_chat_template(processing_class)
    kwargs = {**(example.get("chat_template_kwargs") or {}), **template_kwargs}
    tools = tools or None  # an empty list makes some templates (Llama) render tool boilerplate

    def render(messages: list[dict], **extra: Any) -> str:
        return processing_class.apply_chat_template(messages, tools=tools, tokenize=False, **extra, **kwargs)

    out: dict[str, Any] = {}
    if "messages" in example:
        out["text"] = render(example["messages"])
    if "prompt" in example:
        last = example["prompt"][-1]["role"]
        if last not in ("user", "tool", "assistant", "system"):
            raise ValueError(f"Invalid role in the last message: {last}")
        prompt = render(example["prompt"], add_generation_prompt=last != "assistant",
                        continue_final_message=last == "assistant")
        full = {k: render(example["prompt"] + example[k]) for k in ("chosen", "rejected", "completion")
                if k in example}
        for text in full.values():
            prompt = _common_prefix(prompt, text)
        out["prompt"] = prompt
        out.update({k: text[len(prompt):] for k, text in full.items()})
    else:
        out.update({k: render(example[k]) for k in ("chosen", "rejected") if k in example})
    if "label" in example:
        out["label"] = example["label"]
    return out


def maybe_apply_chat_template(example: dict[str, Any], processing_class, tools: list | None = None,
                              **template_kwargs: Any) -> dict[str, Any]:
    """`apply_chat_template` for a conversational row; a standard (text) row is returned unchanged."""
    if is_conversational(example):
        return apply_chat_template(example, processing_class, tools, **template_kwargs)
    return example


def clone_chat_template(model, tokenizer, source_tokenizer_path: str, resize_to_multiple_of: int | None = 64):
    """Give `tokenizer` the chat template of `source_tokenizer_path` (a Hub id, a directory or a built-in name),
    add the source's added tokens it lacks, take the source's EOS token (also into the model's config and
    generation config), and resize the model's embeddings to the new vocabulary rounded up to
    `resize_to_multiple_of`; the rows the rounding adds get placeholder tokens `<extra_id_N>` so tokenizer and
    embeddings have one size. Returns (model, tokenizer, added tokens)."""
    from transformers import AddedToken

    from posttrain.models.loading import load_tokenizer

    source = load_tokenizer(source_tokenizer_path)
    template = source.chat_template
    if template is None:
        raise UserError(f"{source_tokenizer_path!r} has no chat template to clone; choose a tokenizer with one.")
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    added = [token for token in source.added_tokens_decoder.values() if token.content not in vocab]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = source.eos_token
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.resize_token_embeddings(len(tokenizer.get_vocab()), pad_to_multiple_of=resize_to_multiple_of)
    rows = model.get_input_embeddings().weight.shape[0]
    index = 0
    while len(tokenizer.get_vocab()) < rows:
        placeholder = AddedToken(f"<extra_id_{index}>")
        if tokenizer.add_tokens(placeholder) == 1:
            added.append(placeholder)
        index += 1
    if len(tokenizer.get_vocab()) != rows:
        raise UserError(f"clone_chat_template: the tokenizer has {len(tokenizer.get_vocab())} tokens but the model "
                        f"{rows} embedding rows; the target tokenizer maps several ids to one token — resize with "
                        "resize_to_multiple_of=None.")
    return model, tokenizer, added
