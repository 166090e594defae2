"""Vision-language models (VLMs): built-in tiny VLMs, processor loading, and the model inputs images add.

Built-in tiny VLMs, addressable by name like the text built-ins (`models/builtin.py`) and materialised on first use
into `$POSTTRAIN_CACHE/models/<name with / as -->` with seed-0 weights, the shipped tokenizer plus the image tokens,
a ChatML chat template that renders `{"type": "image"}` blocks, and a saved processor — so `AutoProcessor` and
`AutoModelForImageTextToText` load them like any local checkpoint, offline:

    posttrain/tiny-llava     LLaVA: CLIP vision tower (hidden 64, 2 layers, 32x32 images, patch 8 → 16 image
                             tokens) + 2-layer MLP projector + Qwen2 LM (hidden 128, 2 layers, vocab 4,160);
                             LlavaProcessor with the PIL CLIP image processor (no torchvision needed)
    posttrain/tiny-idefics3  Idefics3 / SmolVLM: Idefics3 vision tower (hidden 64, 2 layers, 32x32, patch 8) +
                             pixel-shuffle connector (scale 2 → 4 image tokens) + Llama LM (same shape); Idefics3Processor
                             with the PIL Idefics3 image processor, image splitting off
    posttrain/tiny-qwen2vl   Qwen2-VL: its vision tower (embed 64, 2 layers, patch 14, 2x2 merge: a 32x32 image →
                             4 image tokens) + Qwen2-VL LM with M-RoPE (hidden 128, 2 layers); the image-only processor
    posttrain/tiny-qwen2_5vl Qwen2.5-VL: its vision tower (hidden 64, 2 layers: one windowed, one full attention;
                             RMSNorm, gated MLP; same patches and merge) + Qwen2.5-VL LM (same shape); the image-only
                             processor

Qwen2-VL / Qwen2.5-VL without torchvision: transformers' processors for them refuse to be built without their video
processor, which needs torchvision, and torchvision does not import beside this machine's torch build. Their image
processor (PIL) and the models run; `image_only_processor` builds the processor from its parts with the video
processor left out (images work through transformers' own call, expansion and `mm_token_type_ids`; videos do not),
its `save_pretrained` saves those parts, and `load_processor` puts them back together when `AutoProcessor` cannot
(the built-ins, directories saved from them or trained here, and real checkpoints as the Hub ships them: a
`preprocessor_config.json` naming the processor class, a `chat_template.json`; `AutoProcessor` stops at the video
processor it builds for them).

Also here: `image_inputs(batch)`, the keys a VLM's forward takes besides the token ids (`pixel_values`,
`pixel_attention_mask`, `image_grid_thw`, `image_sizes`), and `freeze_vision_tower`.
Not here: images in datasets and collation (`data/vision.py`), the loading entry point (`models/loading.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from posttrain.errors import UserError

IMAGE_INPUT_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "mm_token_type_ids")

# ChatML that renders content blocks: text as is, each image block as the model's image placeholder, which the
# processor then expands into the image's tokens.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'image' %}{{- 'IMAGE_BLOCK' }}"
    "{%- elif block['type'] == 'text' %}{{- block['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

_QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # both Qwen-VL families
_TEXT = dict(vocab_size=4160, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048,
             hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02, pad_token_id=0, eos_token_id=2,
             bos_token_id=None)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)

BUILTIN_VLMS: dict[str, dict] = {
    "posttrain/tiny-llava": {"family": "llava", "text": {"model_type": "qwen2", **_TEXT},
                             "vision": {"model_type": "clip_vision_model", **_VISION, "projection_dim": 64},
                             "image_tokens": ["<image>"]},
    "posttrain/tiny-idefics3": {"family": "idefics3", "text": {"model_type": "llama", **_TEXT},
                                "vision": dict(_VISION),
                                "image_tokens": ["<fake_token_around_image>", "<image>", "<global-img>",
                                                 "<end_of_utterance>"]},
    "posttrain/tiny-qwen2vl": {"family": "qwen2vl", "text": {**_TEXT, "rope_scaling": {
                                   "type": "mrope", "mrope_section": [4, 6, 6]}},
                               "vision": dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                               "image_tokens": _QWEN_VL_TOKENS},
    "posttrain/tiny-qwen2_5vl": {"family": "qwen2_5vl", "text": {**_TEXT, "rope_scaling": {
                                     "type": "mrope", "mrope_section": [4, 6, 6]}},
                                 # window 112 px = 4x4 merged patches (a 32x32 image has 2x2); block 1 attends fully
                                 "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                                out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                                                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
                                 "image_tokens": _QWEN_VL_TOKENS},
}
_QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_IMAGE_BLOCK = {"llava": "<image>", "idefics3": "<image>", "qwen2vl": _QWEN_VL_IMAGE, "qwen2_5vl": _QWEN_VL_IMAGE}
# the Qwen-VL families: (transformers model_type, config class, model class); one image processor and processor path
_QWEN_VL = {"qwen2vl": ("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
            "qwen2_5vl": ("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


def chat_template(family: str) -> str:
    return _CHAT_TEMPLATE.replace("IMAGE_BLOCK", _IMAGE_BLOCK[family])


def is_builtin_vlm(name: str) -> bool:
    return name in BUILTIN_VLMS


def _fingerprint(name: str) -> str:
    from posttrain.models.builtin import builtin_tokenizer_path

    digest = hashlib.sha256(json.dumps(BUILTIN_VLMS[name], sort_keys=True).encode() + _CHAT_TEMPLATE.encode()
                            + str(_PROCESSOR_VERSION).encode())
    for file in sorted(os.listdir(builtin_tokenizer_path())):
        with open(os.path.join(builtin_tokenizer_path(), file), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _tokenizer(image_tokens: list[str], template: str):
    from transformers import AutoTokenizer

    from posttrain.models.builtin import builtin_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    tokenizer.add_tokens(image_tokens, special_tokens=True)  # ids 4096.. (the LM's vocabulary has room to 4,160)
    tokenizer.chat_template = template
    return tokenizer


def _build(name: str):
    """(model, processor) of a built-in VLM, seed-0 weights."""
    import torch
    import transformers as tf

    entry = BUILTIN_VLMS[name]
    template = chat_template(entry["family"])
    tokenizer = _tokenizer(entry["image_tokens"], template)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if entry["family"] == "llava":
        config = tf.LlavaConfig(vision_config=entry["vision"], text_config=entry["text"], image_token_id=image_id,
                                vision_feature_layer=-1, vision_feature_select_strategy="default",
                                image_seq_length=16, tie_word_embeddings=True)
        image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=template)
        model_class = tf.LlavaForConditionalGeneration
    elif entry["family"] in _QWEN_VL:
        model_type, config_class, model_class = _QWEN_VL[entry["family"]]
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        config = getattr(tf, config_class)(vision_config=entry["vision"], text_config=entry["text"],
                                           tie_word_embeddings=True, **ids)
        # 32x32 images → a 4x4 grid of 14-pixel patches → 4 image tokens after the 2x2 merge (Qwen2.5-VL's image
        # processor is Qwen2-VL's)
        image_processor = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                                      merge_size=2)
        processor = image_only_processor(model_type, image_processor, tokenizer, template)
        model_class = getattr(tf, model_class)
    else:
        config = tf.Idefics3Config(vision_config=entry["vision"], text_config=entry["text"], image_token_id=image_id,
                                   scale_factor=2, tie_word_embeddings=True, pad_token_id=0)
        image_processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                       do_image_splitting=False)
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                         chat_template=template)
        model_class = tf.Idefics3ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config).to(torch.float32)
    return model, processor


def _write(name: str, out: str, fingerprint: str) -> None:
    from transformers import GenerationConfig

    from posttrain.models.builtin import _STAMP

    model, processor = _build(name)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    GenerationConfig(eos_token_id=2, pad_token_id=0).save_pretrained(out)
    with open(os.path.join(out, _STAMP), "w") as f:
        json.dump({"name": name, "fingerprint": fingerprint}, f)


def builtin_vlm_path(name: str) -> str:
    """The local directory of built-in VLM `name`, written on first use (atomically, as the text built-ins)."""
    import shutil

    from posttrain.models.builtin import _is_current, _swap_in, _wait_until_current, cache_dir

    root = os.path.join(cache_dir(), "models")
    final = os.path.join(root, name.replace("/", "--"))
    fingerprint = _fingerprint(name)
    if _is_current(final, fingerprint):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=root)
    os.chmod(tmp, 0o755)
    try:
        _write(name, tmp, fingerprint)
        if os.path.isfile(os.path.join(tmp, "config.json")):
            _swap_in(tmp, final, fingerprint)
        else:
            _wait_until_current(final, fingerprint)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---- any VLM ------------------------------------------------------------------------------------------------------
def is_vision_config(config) -> bool:
    """Whether a transformers config (or a local directory / name holding one) is an image-text-to-text model."""
    if isinstance(config, str):
        path = os.path.join(config, "config.json")
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            config = json.load(f)
        return "vision_config" in config
    return getattr(config, "vision_config", None) is not None


def is_vision_model(model) -> bool:
    return is_vision_config(getattr(model, "config", None))


_PROCESSOR_VERSION = 1  # bump when the saved processor files change
# models whose transformers processor insists on a video processor (torchvision): built here from their parts
_IMAGE_ONLY = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def image_only_processor(model_type: str, image_processor, tokenizer, template: str | None):
    """The model's processor (Qwen2-VL, Qwen2.5-VL) without its video processor: images and text only. transformers
    refuses to build it without a video processor, and the video processor needs torchvision; a subclass lets the
    missing video processor through (videos then fail, images work — the call, expansion and mm_token_type_ids
    are transformers' own)."""
    import transformers as tf

    base = getattr(tf, _IMAGE_ONLY[model_type])

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, attribute_name, arg):
            if attribute_name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(attribute_name, arg)

        def save_pretrained(self, save_directory, **kwargs):
            """Its parts (image processor, tokenizer, chat template), which `load_processor` puts back together
            (transformers' own save stops at the missing video processor); `Trainer.save_model` calls this."""
            os.makedirs(save_directory, exist_ok=True)
            self.image_processor.save_pretrained(save_directory)
            self.tokenizer.save_pretrained(save_directory)
            if self.chat_template:
                with open(os.path.join(save_directory, "chat_template.jinja"), "w") as f:
                    f.write(self.chat_template)
            return [save_directory]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=template)


def _saved_chat_template(path: str) -> str | None:
    """The processor's chat template saved beside a checkpoint (local directory or Hub id): `chat_template.jinja`,
    or the older `chat_template.json` that Qwen2-VL / Qwen2.5-VL checkpoints ship."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if file:
            with open(file) as f:
                return f.read() if name.endswith(".jinja") else json.load(f).get("chat_template")
    return None


def _image_only_from_parts(path: str):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in _IMAGE_ONLY:
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = _saved_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return image_only_processor(model_type, AutoImageProcessor.from_pretrained(path), tokenizer, template)


def image_text_auto_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def load_processor(path: str):
    """`AutoProcessor` of a VLM directory or Hub id, with a one-line error where its image or video processor needs
    torchvision (Qwen2-VL / Qwen2.5-VL) and torchvision cannot be imported here."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as e:
        try:
            processor = _image_only_from_parts(path)  # Qwen2-VL / Qwen2.5-VL without torchvision
        except Exception:
            processor = None
        if processor is not None:
            return processor
        if "video" in str(e).lower() or "torchvision" in str(e).lower() or "VIDEO" in str(e):
            raise UserError(f"The processor of {path!r} needs a video processor, which needs torchvision, and "
                            "torchvision cannot be imported here. Install a torchvision matching your torch, or use "
                            "a LLaVA-style or Idefics3/SmolVLM model (posttrain/tiny-llava, posttrain/tiny-idefics3)."
                            ) from e
        raise


def image_inputs(batch) -> dict:
    """The image tensors of a collated batch that the model's forward takes (empty for text batches)."""
    return {key: batch[key] for key in IMAGE_INPUT_KEYS if key in batch and batch[key] is not None}


def vision_tower(model):
    """The vision encoder (and its projector/connector) modules of a VLM, under PEFT/DDP wrappers."""
    from posttrain.models.logprobs import _base_model

    base = _base_model(model)
    inner = getattr(base, "model", base)
    parts = [getattr(inner, name) for name in ("vision_tower", "vision_model", "visual")
             if getattr(inner, name, None) is not None]
    if not parts:
        raise UserError(f"freeze_vision_tower: found no vision tower in {type(base).__name__} (looked for "
                        "vision_tower, vision_model, visual).")
    return parts


def freeze_vision_tower(model) -> int:
    """Stop gradients into the vision encoder; returns the number of frozen parameters."""
    count = 0
    for part in vision_tower(model):
        for parameter in part.parameters():
            parameter.requires_grad_(False)
            count += parameter.numel()
    return count
