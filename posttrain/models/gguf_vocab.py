"""A transformers tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template), for export.

llama.cpp rebuilds a byte-level BPE tokenizer ("gpt2" model) from: the token strings in id order, a type per token
(normal, control = special, user-defined = added but not special, unused = padding rows), the merges, the special
token ids, whether to add BOS/EOS, and a *pre-tokenizer name* (`tokenizer.ggml.pre`) that selects how text is split
before the merges run. The name is not stored anywhere in a tokenizer.json, so `pre_tokenizer_name` recognises it
by behaviour: it splits a probe text with the tokenizer's own pre-tokenizer and with each known splitting, and
takes the one that agrees on every piece.

Only byte-level BPE vocabularies are written (Llama 3, Qwen2, SmolLM, GPT-2 and posttrain's built-in tokenizer
are); sentencepiece vocabularies are refused in one line.
Not here: weights and model hyperparameters (`models/gguf_export.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from posttrain.errors import UserError

logger = logging.getLogger(__name__)

# Pre-tokenizer regexes, as published with each tokenizer family.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Letters, digit runs, contractions, punctuation runs, blank lines, tabs, runs of spaces and non-Latin scripts:
# the cases where the splittings below differ.
PROBE = ("Hello World! It's 1234567 apples, they'll cost $3.50...\n\n\tTabs  and   spaces I'M HERE\r\n"
         "ünïcödé 你好世界 ١٢٣ x2y3 'quoted' don't   \n ")


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unknown / padding
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _candidates() -> dict[str, object]:
    from tokenizers import Regex, pre_tokenizers

    def split_then_bytes(pattern: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return {"gpt-2": gpt2, "qwen2": split_then_bytes(_QWEN2_SPLIT), "llama-bpe": split_then_bytes(_LLAMA3_SPLIT),
            "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])}


def pre_tokenizer_name(backend) -> str:
    """llama.cpp's name for how `backend` (a `tokenizers.Tokenizer`) splits text; "default" when none matches."""
    ours = backend.pre_tokenizer
    if ours is None:
        return "default"
    pieces = [piece for piece, _ in ours.pre_tokenize_str(PROBE)]
    for name, candidate in _candidates().items():
        if [piece for piece, _ in candidate.pre_tokenize_str(PROBE)] == pieces:
            return name
    logger.warning("The tokenizer's pre-tokenizer matches none llama.cpp knows by name (gpt-2, qwen2, llama-bpe, "
                   "smollm); writing 'default', so llama.cpp may split some text differently than transformers.")
    return "default"


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of `tokenizer` for a model with `vocab_size` embedding rows (rows past the
    tokenizer's vocabulary become unused `[PAD<id>]` tokens, as llama.cpp needs one token per row)."""
    from gguf import TokenType

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        kind = model.get("type") or type(tok).__name__
        raise UserError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM); "
                        f"this tokenizer is {kind}. Convert the model with llama.cpp's convert_hf_to_gguf.py.")
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or ():
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"The tokenizer has token id {max(by_id)} but the model only {vocab_size} embedding rows; "
                        "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting.")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    special_ids = {}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            special_ids[key] = value
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return GGUFVocab(tokens, types, merges, pre_tokenizer_name(backend), special_ids,
                     bool(getattr(tok, "add_bos_token", False)), bool(getattr(tok, "add_eos_token", False)), template)


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add `vocab` to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unknown": writer.add_unk_token_id,
              "padding": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
