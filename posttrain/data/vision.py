"""Images in datasets (TRL's vision formats): loading, placing, tokenising with the processor, truncating, collating.

A vision dataset has an `images` column (a list of images per row) or an `image` column (one image per row); an
image is a PIL image, a file path, raw bytes, or a datasets Image dict ({"bytes", "path"}). Text is TRL's: standard
strings that hold the model's image placeholder (e.g. `<image>`) once per image, or conversational messages whose
content is a string or `{"type": "image"}` / `{"type": "text", "text": …}` blocks. String contents are turned into
blocks with the row's images placed before the text of the first user message, as TRL does.

Tokenising: the chat template renders the text, the processor expands each placeholder into the image's tokens (its
count depends on the model and, for some, on the image size). Prompt and completions are tokenised apart and
concatenated (as TRL's vision collators do); completions carry no image. Image tokens never carry a loss.
Truncation never cuts inside an image's tokens: rows where max_length (or max_prompt_length) would remove an image
token are dropped and counted. Decoded images are kept in the `images` column; the collator turns them into
`pixel_values` (+ `pixel_attention_mask` / `image_grid_thw` / `image_sizes`, as the image processor returns).

Not here: the text-only pipelines (`data/prepare.py`), models and processors (`models/vision.py`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets

from posttrain.data import formats
from posttrain.errors import UserError

logger = logging.getLogger(__name__)
IMAGE_COLUMNS = ("images", "image")


def image_column(columns) -> str | None:
    return next((c for c in IMAGE_COLUMNS if c in (columns or [])), None)


def is_vision_dataset(dataset) -> bool:
    if dataset is None:
        return False
    columns = dataset.column_names if not isinstance(dataset, dict) else None
    if columns is None and isinstance(dataset, datasets.IterableDataset):
        columns = list(next(iter(dataset)).keys())
    return image_column(columns) is not None


def is_vision_processor(processing_class) -> bool:
    """A processor that handles images (LlavaProcessor, Idefics3Processor, …), not a bare tokenizer."""
    return getattr(processing_class, "image_processor", None) is not None and hasattr(processing_class, "tokenizer")


# ---- images -------------------------------------------------------------------------------------------------------
def load_image(value: Any, where: str):
    """One image as an RGB PIL image; a one-line error naming `where` (the row) when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):  # datasets' undecoded Image: {"bytes": …, "path": …}
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            if not os.path.isfile(value):
                raise UserError(f"{where}: image file {str(value)!r} does not exist. Fix the path or drop the row.")
            image = Image.open(value)
        else:
            raise UserError(f"{where}: an image must be a PIL image, a file path or bytes, got "
                            f"{type(value).__name__} ({value!r:.60}).")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{where}: the image cannot be decoded ({type(e).__name__}: {str(e)[:80]}); the file or bytes "
                        "are corrupt or not an image. Fix or drop the row.") from e


def row_images(example: dict[str, Any], column: str, where: str) -> list:
    value = example.get(column)
    if column == "image":
        value = [] if value is None else [value]
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: column 'images' must hold a list of images per row, got {type(value).__name__}; "
                        "use an 'image' column for one image per row.")
    return [load_image(v, f"{where}, image {i}") for i, v in enumerate(value)]


def count_image_blocks(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for block in m["content"] if isinstance(block, dict) and block.get("type") == "image")


def with_image_blocks(messages: list[dict], num_images: int) -> list[dict]:
    """Content as blocks; when no message has an image block yet, `num_images` image blocks go before the text of
    the first user message whose content is a string (TRL's placement)."""
    placed = count_image_blocks(messages) > 0
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                blocks = [{"type": "image"} for _ in range(num_images)] + blocks
                placed = True
            message = {**message, "content": blocks}
        out.append(message)
    return out


def thumbnail_uri(image, size: int = 64) -> str:
    """A PNG data URI of `image` scaled to fit size x size (report tables show the images that prompts held)."""
    import base64

    image = load_image(image, "thumbnail").copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- tokenising ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def image_tokenizer(processor) -> ImageTokenizer:
    """The `ImageTokenizer` of a processor, built once (it runs the processor on a probe image)."""
    return ImageTokenizer(processor)


class ImageTokenizer:
    """The processor's text side: chat rendering, tokenising with image expansion, and which ids are image tokens."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.placeholder)
        self.image_ids = self._expansion_ids()

    def _expansion_ids(self) -> frozenset[int]:
        """Ids the processor writes for an image (the image token and any markers around it): the ids of one
        expanded placeholder that plain text does not produce."""
        from PIL import Image

        expanded = self.processor(text=[self.placeholder], images=[[Image.new("RGB", (32, 32))]],
                                  add_special_tokens=False)["input_ids"][0]
        plain = set(self.tokenizer("x", add_special_tokens=False)["input_ids"])
        return frozenset(int(i) for i in expanded) - plain | {self.image_token_id}

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> str:
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template is None:
            raise UserError("Conversational image data needs a chat template, and this processor has none. Set "
                            "chat_template_path in the config.")
        return self.processor.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message)

    def encode(self, text: str, images: list, where: str) -> list[int]:
        """Token ids of `text` with each image placeholder expanded; the placeholder count must match."""
        found = text.count(self.placeholder)
        if found != len(images):
            raise UserError(f"{where}: {len(images)} image(s) but {found} image placeholder(s) "
                            f"({self.placeholder!r}) in the text. Give one {{'type': 'image'}} block (or one "
                            f"{self.placeholder} in standard text) per image.")
        if not images:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [int(i) for i in self.processor(text=[text], images=[images], add_special_tokens=False)["input_ids"][0]]

    def token_types(self, input_ids) -> dict:
        """`mm_token_type_ids` (1 on image tokens) for models whose positions depend on them (Qwen2-VL's M-RoPE:
        its processor returns them); {} for the others."""
        if "mm_token_type_ids" not in getattr(self.processor, "model_input_names", ()):
            return {}
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}

    def untrained_image_tokens(self, ids: list[int], mask: list[int]) -> list[int]:
        return [0 if i in self.image_ids else m for i, m in zip(ids, mask)]

    def pixel_inputs(self, images: list[list]) -> dict:
        """The image processor's tensors for a batch of rows' images (rows may hold none)."""
        if not any(images):
            return {}
        if sum(1 for row in images if row) < len(images):
            images = [row for row in images if row]  # tensors follow the images, not the rows
        return dict(self.processor.image_processor(images, return_tensors="pt"))


def _split_prompt(tokens: ImageTokenizer, prompt, completions: list, images: list, eos: str | None, where: str):
    """(prompt ids, [completion ids…]) with the images in the prompt."""
    if isinstance(prompt, list):
        prompt = with_image_blocks(prompt, len(images))
        last = prompt[-1]["role"] if prompt else "user"
        prompt_text = tokens.render(prompt, add_generation_prompt=last in ("user", "tool", "system"),
                                    continue_final_message=last == "assistant") if prompt else ""
        texts = []
        for completion in completions:
            full = tokens.render(prompt + with_image_blocks(completion, 0))
            if not full.startswith(prompt_text):
                raise UserError(f"{where}: the chat template renders the prompt differently alone and followed by the "
                                "completion, so the completion cannot be located.")
            texts.append(full[len(prompt_text):])
    else:
        prompt_text = prompt
        texts = [c if not eos or c.endswith(eos) else c + eos for c in completions]
    return tokens.encode(prompt_text, images, where), [tokens.encode(t, [], where) for t in texts]


def _messages_with_mask(tokens: ImageTokenizer, messages: list, images: list, assistant_only: bool, where: str):
    """A whole conversation: ids and a mask (1 on every token, or only on assistant turns), rendered in pieces cut
    at the assistant turns' boundaries so each piece's images go with it."""
    messages = with_image_blocks(messages, len(images))
    full = tokens.render(messages)
    cuts = [0]
    if assistant_only:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(tokens.render(messages[:i], add_generation_prompt=True)) if i else 0
            end_text = tokens.render(messages[: i + 1])
            if not full.startswith(end_text) or start > len(end_text):
                raise UserError(f"{where}: assistant_only_loss: the chat template does not render the conversation "
                                "turn by turn; use a template that does (chat_template_path).")
            cuts += [start, len(end_text)]
    cuts.append(len(full))
    ids, mask, used = [], [], 0
    for k in range(len(cuts) - 1):
        piece = full[cuts[k]:cuts[k + 1]]
        n = piece.count(tokens.placeholder)
        piece_ids = tokens.encode(piece, images[used:used + n], where)
        used += n
        trained = 1 if not assistant_only else k % 2  # pieces alternate: other, assistant, other, …
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    if used != len(images):
        tokens.encode(full, images, where)  # raises the count mismatch
    return ids, mask


def _fits(ids: list[int], image_ids: frozenset[int], max_length: int, keep_end: bool = False) -> bool:
    """Whether cutting `ids` to max_length (its start, or its end with keep_end) keeps every image token."""
    if len(ids) <= max_length:
        return True
    cut = ids[:-max_length] if keep_end else ids[max_length:]
    return not any(i in image_ids for i in cut)


def _drop(dataset, keep, name: str, why: str, fix: str):
    before = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    dataset = dataset.filter(keep)
    if before is not None:
        after = len(dataset)
        if after < before:
            logger.warning("%s dataset: dropped %d of %d examples (%s).", name, before - after, before, why)
        if after == 0:
            raise UserError(f"Every {name} example was dropped ({why}). {fix}")
    return dataset


def _start(dataset, name: str):
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise UserError(f"The {name} dataset is empty; give at least one example.")
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    column = image_column(columns)
    return columns, column, [c for c in columns if c not in IMAGE_COLUMNS]


def _map(dataset, fn, remove: list[str], name: str, args):
    kwargs = {"desc": f"Tokenizing {name} dataset (images)", "num_proc": args.dataset_num_proc} \
        if isinstance(dataset, datasets.Dataset) else {}
    return dataset.map(fn, with_indices=True, remove_columns=remove, **kwargs)


def prepare_vision_sft_dataset(dataset, processor, args, name: str = "train"):
    """Image SFT rows → input_ids, completion_mask (image tokens 0), images."""
    if args.packing:
        raise UserError("packing=True cannot be used with image datasets (each row's images must stay with its "
                        "tokens); set packing=False.")
    columns, column, text_columns = _start(dataset, name)
    kind = formats.require_type(text_columns, ("language_modeling", "prompt_completion"), "SFTTrainer",
                                args.dataset_text_field)
    if args.completion_only_loss is True and kind != "prompt_completion":
        raise UserError(f"completion_only_loss=True needs prompt-completion data; this {name} dataset is language "
                        "modelling data. Drop the option (or use assistant_only_loss for messages).")
    tokens, eos = image_tokenizer(processor), processor.tokenizer.eos_token
    completion_only = args.completion_only_loss is not False

    def one(example, index):
        where = f"Row {index} of the {name} dataset"
        images = row_images(example, column, where)
        if kind == "prompt_completion":
            prompt_ids, (completion_ids,) = _split_prompt(tokens, example["prompt"], [example["completion"]], images,
                                                          eos, where)
            ids = prompt_ids + completion_ids
            mask = [0 if completion_only else 1] * len(prompt_ids) + [1] * len(completion_ids)
        elif isinstance(example.get("messages"), list) and args.dataset_text_field not in example:
            ids, mask = _messages_with_mask(tokens, example["messages"], images, args.assistant_only_loss, where)
        else:
            if args.assistant_only_loss:
                raise UserError("assistant_only_loss=True needs conversational data (a 'messages' column).")
            text = example[args.dataset_text_field]
            ids = tokens.encode(text if not eos or text.endswith(eos) else text + eos, images, where)
            mask = [1] * len(ids)
        return {"input_ids": ids, "completion_mask": tokens.untrained_image_tokens(ids, mask), "images": images}

    dataset = _map(dataset, one, columns, name, args)
    dataset = _drop(dataset, lambda ex: any(ex["completion_mask"]), name, "no token to train on",
                    "Give every row a completion (or an assistant turn with assistant_only_loss).")
    if args.max_length is not None:
        keep_end = args.truncation_mode == "keep_end"
        dataset = _drop(dataset, lambda ex: _fits(ex["input_ids"], tokens.image_ids, args.max_length, keep_end),
                        name, f"truncation to max_length={args.max_length} would cut an image's tokens",
                        "Raise max_length.")
        length = args.max_length

        def cut(ex):
            sl = slice(-length, None) if keep_end else slice(0, length)
            return {"input_ids": ex["input_ids"][sl], "completion_mask": ex["completion_mask"][sl]}

        dataset = dataset.map(cut)
        dataset = _drop(dataset, lambda ex: any(ex["completion_mask"]), name,
                        f"no trainable token left after truncation to max_length={args.max_length}",
                        "Raise max_length or shorten the prompts.")
    return dataset


def prepare_vision_preference_dataset(dataset, processor, args, name: str = "train", who: str = "DPOTrainer"):
    """Image preference rows → prompt_ids (images expanded), chosen_ids, rejected_ids, images."""
    columns, column, text_columns = _start(dataset, name)
    kind = formats.require_type(text_columns, ("preference", "preference_implicit"), who)
    if kind == "preference_implicit":
        dataset = dataset.map(formats.extract_prompt)
    tokens, eos = image_tokenizer(processor), processor.tokenizer.eos_token
    extra = [c for c in ("ref_chosen_logps", "ref_rejected_logps", "margin") if c in columns]

    def one(example, index):
        where = f"Row {index} of the {name} dataset"
        images = row_images(example, column, where)
        prompt_ids, (chosen, rejected) = _split_prompt(tokens, example["prompt"],
                                                       [example["chosen"], example["rejected"]], images, eos, where)
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "images": images}

    dataset = _map(dataset, one, [c for c in dataset.column_names or columns if c not in extra], name, args)
    max_prompt, max_length = getattr(args, "max_prompt_length", None), getattr(args, "max_length", None)
    max_completion = getattr(args, "max_completion_length", None)
    if max_prompt is not None:
        dataset = _drop(dataset, lambda ex: _fits(ex["prompt_ids"], tokens.image_ids, max_prompt, keep_end=True),
                        name, f"max_prompt_length={max_prompt} would cut an image's tokens",
                        "Raise max_prompt_length.")
    if any(v is not None for v in (max_prompt, max_length, max_completion)):
        def cut(ex):
            prompt = ex["prompt_ids"][-max_prompt:] if max_prompt else ex["prompt_ids"]
            out = {"prompt_ids": prompt}
            for key in ("chosen_ids", "rejected_ids"):
                ids = ex[key][:max_completion] if max_completion else ex[key]
                out[key] = ids[:max(max_length - len(prompt), 0)] if max_length else ids
            return out

        dataset = dataset.map(cut)
        dataset = _drop(dataset, lambda ex: len(ex["chosen_ids"]) > 0 and len(ex["rejected_ids"]) > 0, name,
                        f"prompt fills max_length={max_length}", "Raise max_length.")
    return dataset


# ---- collating ----------------------------------------------------------------------------------------------------
@dataclass
class DataCollatorWithImages:
    """A text collator (`data/collators.py`) plus the rows' images as the model's image tensors.

    `repeat`: how many times the batch's rows repeat in the text batch (2 for preference pairs: chosen rows, then
    rejected rows, each with the same images)."""

    text_collator: Any
    processor: Any
    repeat: int = 1

    def __post_init__(self):
        self.tokens = image_tokenizer(self.processor)

    def __call__(self, examples: list[dict[str, Any]]) -> dict:
        images = [list(ex.get("images") or []) for ex in examples]
        batch = self.text_collator([{k: v for k, v in ex.items() if k != "images"} for ex in examples])
        batch.update(self.tokens.pixel_inputs([[load_image(im, "batch") for im in row] for row in images]
                                              * self.repeat))
        if "pixel_values" in batch:
            batch.update(self.tokens.token_types(batch["input_ids"]))
        return batch


def prompt_ids_with_images(tokens: ImageTokenizer, prompt, images: list, where: str) -> list[int]:
    """The ids a VLM continues from: the prompt rendered with the generation prompt, images expanded."""
    return _split_prompt(tokens, prompt, [], images, None, where)[0]


def prepare_vision_prompts(dataset, processor, args, name: str = "train"):
    """Prompt-only image rows (GRPO, RLOO): every image decoded (errors name the row) and its placeholders checked
    against the prompt; prompts whose image tokens max_prompt_length would cut are dropped and counted. The image
    column keeps its name (reward functions receive it as a keyword, as in TRL); other columns are kept."""
    columns, column, text_columns = _start(dataset, name)
    if "prompt" not in text_columns:
        formats.require_type(text_columns, ("prompt_only",), "this trainer")
    tokens = image_tokenizer(processor)
    max_prompt = getattr(args, "max_prompt_length", None)

    def one(example, index):
        where = f"Row {index} of the {name} dataset"
        if not example.get("prompt"):
            raise UserError(f"{where} has an empty or missing 'prompt'. Remove such rows.")
        images = row_images(example, column, where)
        ids = prompt_ids_with_images(tokens, example["prompt"], images, where)
        fits = max_prompt is None or _fits(ids, tokens.image_ids, max_prompt, keep_end=True)
        return {column: images if column == "images" else (images[0] if images else None), "_fits": fits}

    kwargs = {"desc": f"Checking {name} prompts (images)", "num_proc": args.dataset_num_proc} \
        if isinstance(dataset, datasets.Dataset) else {}
    dataset = dataset.map(one, with_indices=True, **kwargs)
    dataset = _drop(dataset, lambda ex: ex["_fits"], name, f"max_prompt_length={max_prompt} would cut an image's "
                    "tokens", "Raise max_prompt_length.")
    return dataset.remove_columns(["_fits"])
