"""`posttrain generate`: try a trained model from the command line.

    posttrain generate --model outputs/sft-arith --prompt "Tom has 3 apples …"     one completion, printed
    posttrain generate --model outputs/sft-arith --chat --prompt "hi"               prompt wrapped as a user turn
    posttrain generate --model outputs/sft-arith                                    a chat loop on stdin
    posttrain generate --model posttrain/tiny-llava --image cat.png --prompt "What is this?"   a VLM, one image

Decoding is greedy unless --temperature > 0 (then sampled, with --top_p). The loop reads one message per line
and keeps the conversation when the tokenizer has a chat template (otherwise each line is a separate prompt);
`/reset` clears the history, `/exit` or end of input ends it. Not here: training-time generation
(`rollout/hf.py`), held-out scoring (`evaluation.py`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import torch

from posttrain.errors import UserError


class GenerateError(UserError):
    """A bad option or model for `posttrain generate`."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain generate", description="Generate from a trained model.",
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="output_dir of a run, a Hub id, or a built-in name")
    p.add_argument("--prompt", help="the prompt; without it, a chat loop reads messages from stdin")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message with the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image for a vision-language model (repeat for several); needs --prompt")
    p.error = _error  # one line, not argparse's usage + exit
    return p


def _error(message: str) -> None:
    raise GenerateError(f"{message} (see posttrain generate --help)")


def check_options(args: argparse.Namespace) -> None:
    if args.prompt is not None and not args.prompt.strip():
        raise GenerateError("--prompt is empty; give the text to complete, or leave --prompt out for a chat loop")
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise GenerateError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise GenerateError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_return_sequences < 1:
        raise GenerateError(f"--num_return_sequences must be at least 1, got {args.num_return_sequences}")
    if args.image and args.prompt is None:
        raise GenerateError("--image needs --prompt (the question about the image)")
    if args.num_return_sequences > 1 and args.temperature == 0:
        raise GenerateError("--num_return_sequences > 1 needs --temperature > 0 (greedy decoding gives the same "
                            "completion every time)")


def load(model_path: str):
    """(model in eval mode, tokenizer) from a run's output_dir, a Hub id or a built-in name."""
    import os

    from transformers.utils import logging as hf_logging

    from posttrain.models import loading

    hf_logging.disable_progress_bar()  # no "Loading weights" bars around the answer
    if os.path.isfile(model_path):
        raise GenerateError(f"--model {model_path!r} is a file; give the run's output_dir (the directory holding "
                            "config.json and the weights)")
    model = loading.load_pretrained_model(model_path)
    tokenizer = loading.load_tokenizer(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


@torch.no_grad()
def complete(model, tokenizer, prompt: str | list[dict[str, str]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1) -> list[str]:
    """Completions (text, special tokens removed) of a plain-text prompt or a list of chat messages."""
    from posttrain.data.tokenize import tokenize_prompt

    ids = torch.tensor([tokenize_prompt(tokenizer, prompt)], device=model.device)
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                                if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                         "top_k": None})
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def _print_completions(texts: list[str], out: TextIO) -> None:
    if len(texts) == 1:
        print(texts[0], file=out)
        return
    for i, text in enumerate(texts, 1):
        print(f"[{i}] {text}", file=out)


def chat_loop(model, tokenizer, options: dict[str, Any], stdin: TextIO, out: TextIO, err: TextIO) -> None:
    """Read a message per line; answer; keep the history when there is a chat template. /exit or EOF ends."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    interactive = stdin.isatty()
    if interactive:
        mode = "chat (history kept)" if has_template else "no chat template: each line is a separate prompt"
        print(f"posttrain generate: {mode}; /reset clears the history, /exit or Ctrl-D quits", file=err)
    history: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=err, flush=True)
        line = stdin.readline()
        if not line:
            break
        message = line.strip()
        if message == "/exit":
            break
        if message == "/reset":
            history = []
            continue
        if not message:
            continue
        prompt: str | list[dict[str, str]] = history + [{"role": "user", "content": message}] if has_template \
            else message
        texts = complete(model, tokenizer, prompt, **options)
        _print_completions(texts, out)
        if has_template:
            history = prompt + [{"role": "assistant", "content": texts[0]}]


def main(argv: list[str], stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_options(args)
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    torch.manual_seed(args.seed)
    if args.image:  # a vision-language model: the prompt is a user turn with the images before its text
        _print_completions(complete_with_images(args, out), out)
        return
    model, tokenizer = load(args.model)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "num_return_sequences": args.num_return_sequences}
    if args.prompt is None:
        chat_loop(model, tokenizer, options, stdin, out, err)
        return
    prompt: str | list[dict[str, str]] = args.prompt
    if args.chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerateError(f"--chat needs a tokenizer with a chat template and {args.model!r} has none; "
                                "drop --chat to use the prompt as plain text")
        prompt = [{"role": "user", "content": args.prompt}]
    _print_completions(complete(model, tokenizer, prompt, **options), out)


@torch.no_grad()
def complete_with_images(args: argparse.Namespace, out: TextIO) -> list[str]:
    """Completions of --prompt about the --image files by a vision-language model (its processor expands the
    images; `data/vision.py`)."""
    from transformers.utils import logging as hf_logging

    from posttrain.data import vision as data_vision
    from posttrain.models import loading
    from posttrain.models import vision as model_vision
    from posttrain.rollout.vision import to_model

    hf_logging.disable_progress_bar()
    path = loading.resolve_model_path(args.model)
    from transformers import AutoConfig

    if not model_vision.is_vision_config(AutoConfig.from_pretrained(path)):
        raise GenerateError(f"--image needs a vision-language model and {args.model!r} is a text model")
    model = loading.load_pretrained_model(args.model).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    processor = model_vision.load_processor(path)
    images = [data_vision.load_image(p, f"--image {p}") for p in args.image]
    tokens = data_vision.image_tokenizer(processor)
    prompt = [{"role": "user", "content": args.prompt}] if tokens.placeholder not in args.prompt else args.prompt
    ids = torch.tensor([data_vision.prompt_ids_with_images(tokens, prompt, images, "--prompt")], device=model.device)
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
                                 "top_k": 0} if args.temperature > 0 else {"do_sample": False})
    pixels = to_model(tokens.pixel_inputs([images]), model)
    result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                            num_return_sequences=args.num_return_sequences, **pixels, **tokens.token_types(ids),
                            pad_token_id=processor.tokenizer.pad_token_id, suppress_tokens=sorted(tokens.image_ids),
                            **sampling)
    return [t.strip() for t in processor.tokenizer.batch_decode(result[:, ids.shape[1]:], skip_special_tokens=True)]
