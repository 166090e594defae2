"""Build the shipped tokenizer (posttrain/assets/tokenizer/) and chat templates (posttrain/assets/chat_templates/).

A byte-level BPE with 4,096 entries (3 specials + 256 bytes + merges), trained offline with `tokenizers` on the
built-in arithmetic problems and English prose taken from the Python standard library's docstrings. Byte-level
means every unicode string encodes with no unknown token; digits are split one per token before BPE sees them, so
"128" is always "1" "2" "8" — a tiny model then learns column arithmetic instead of memorising number tokens.
Normalisation (NFC) and pre-tokenisation are Qwen2's, so Qwen2Tokenizer (which AutoTokenizer picks for the built-in
qwen2 model directories) and the plain tokenizer.json agree token for token.

Specials: <|endoftext|> (pad, id 0), <|im_start|> (id 1), <|im_end|> (eos, id 2). No BOS.

Run from the repository root: `python scripts/build_tokenizer.py`. The output is committed; rerun only to change it.
"""

from __future__ import annotations

import ast
import codecs
import inspect
import json
import os
import sys
import sysconfig

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from posttrain.data.arith import generate_problems  # noqa: E402  (needs ROOT on sys.path first)

ASSETS = os.path.join(ROOT, "posttrain", "assets")
VOCAB_SIZE = 4096
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Plain ChatML, as Qwen2.5 renders it minus tools and the default system prompt. No trailing newline, so the text
# renders the same whatever the Jinja environment does with a final newline.
CHATML = """{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
# Same rendering; the assistant's content and its closing <|im_end|> sit inside generation markers so
# `return_assistant_tokens_mask=True` marks exactly the tokens a chat model is trained to produce.
CHATML_TRAINING = """{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# Standard-library folders skipped: tests (odd strings, not prose) and vendored or GUI code.
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "dist-packages", "lib2to3",
              "__pycache__", "ensurepip", "pydoc_data"}


def _docstrings(path: str) -> list[str]:
    """Every docstring in one source file, read with `ast` so nothing is imported or run."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef))]
    return [inspect.cleandoc(doc) for doc in map(ast.get_docstring, nodes) if doc]


def english_corpus() -> list[str]:
    """The Zen of Python, pydoc's language-reference topics and the standard library's docstrings: ~2 MB of prose."""
    import this  # noqa: F401  (prints the Zen once; its text is stored ROT13-encoded in this.s)
    from pydoc_data.topics import topics

    texts = [codecs.decode(sys.modules["this"].s, "rot13"), *topics.values()]
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                texts += _docstrings(os.path.join(folder, name))
    return sorted({t for t in texts if len(t) > 40})  # dedupe, stable order


def arithmetic_corpus() -> list[str]:
    texts = []
    for p in generate_problems():
        texts.append(f"Question: {p.question}\nAnswer: {p.solution}")
        texts.append(f"Question: {p.question}\nAnswer: {p.wrong}")
        texts.append(f"system\nYou are a helpful assistant.\nuser\n{p.question}\nassistant\n{p.solution}\n")
    return texts


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # The same normaliser and pre-tokeniser that transformers' Qwen2Tokenizer rebuilds: AutoTokenizer forces that
    # class for any model_type "qwen2" directory (ignoring ours in tokenizer.json), so matching it makes the
    # shipped directory and every built-in model directory tokenise identically. Its split regex isolates each
    # digit (\p{N}), which gives the digit-by-digit numbers we want; NFC means text already in NFC round-trips.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Keeps offsets on the raw characters (needed for assistant masks); adds no BOS/EOS.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in (PAD, IM_START, IM_END)],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save(tokenizer: Tokenizer) -> None:
    out = os.path.join(ASSETS, "tokenizer")
    os.makedirs(out, exist_ok=True)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                             "rstrip": False, "single_word": False} for t in (PAD, IM_START, IM_END)}
    config = {
        # The generic class loads tokenizer.json as is (model directories of type qwen2 get Qwen2Tokenizer
        # instead, which tokenises the same way: see train_tokenizer).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added, "bos_token": None, "eos_token": IM_END, "pad_token": PAD,
        "unk_token": None, "add_bos_token": False, "add_eos_token": False, "model_max_length": 2048,
        "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    _write(os.path.join(out, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"eos_token": IM_END, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}
    _write(os.path.join(out, "special_tokens_map.json"), json.dumps(special, indent=2) + "\n")
    _write(os.path.join(ASSETS, "chat_templates", "chatml.jinja"), CHATML)
    _write(os.path.join(ASSETS, "chat_templates", "chatml_training.jinja"), CHATML_TRAINING)


def main() -> None:
    english, arith = english_corpus(), arithmetic_corpus()
    tokenizer = train_tokenizer(english + arith)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    save(tokenizer)
    chars = sum(map(len, english)), sum(map(len, arith))
    print(f"trained on {len(english)} English texts ({chars[0]:,} chars) and {len(arith)} arithmetic texts "
          f"({chars[1]:,} chars); vocab {tokenizer.get_vocab_size()}; wrote {ASSETS}")


if __name__ == "__main__":
    main()
