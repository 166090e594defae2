"""Images in the trainers: what `PostTrainer` calls when the processing class is a VLM processor.

Each trainer class says which image pipeline its data takes (`vision_data`: "sft", "preference", "prompt", or None
for trainers that do not take images yet); this module picks the dataset preparation (`data/vision.py`), wraps the
trainer's own text collator so the batch also carries the image tensors, applies the freeze-vision-tower option,
keeps LoRA on the language model, and switches off what cannot hold images (padding-free rows, the packed
attention). The forward passes take the image tensors through `models/vision.image_inputs`.

Not here: images in datasets (`data/vision.py`), built-in VLMs and processors (`models/vision.py`).
"""

from __future__ import annotations

import logging

import torch

from posttrain.data import vision as data_vision
from posttrain.errors import UserError
from posttrain.models import vision as model_vision

logger = logging.getLogger(__name__)

# modules of a VLM that are not its language model: LoRA stays off them unless the user names them
VISION_MODULES = r".*(vision_tower|vision_model|visual|multi_modal_projector|connector|image_newline).*"


def load_processing_class(model):
    """The processor of a VLM (None for text models: they load their tokenizer)."""
    if not model_vision.is_vision_model(model):
        return None
    from posttrain.models import loading

    return model_vision.load_processor(loading.resolve_model_path(model.config._name_or_path))


def uses_images(trainer_cls, processing_class, train_dataset, eval_dataset, args, data_collator) -> bool:
    """Whether this run takes the image path; a one-line error where images meet a trainer or model that cannot
    take them. A script that prepares its own batches (TRL's older VLM recipe: `dataset_kwargs={"skip_prepare_dataset":
    True}` with its own `data_collator` calling the processor) keeps them: its pixel values reach the model as they
    are."""
    if (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset") and data_collator is not None:
        return False
    has_images = data_vision.is_vision_dataset(train_dataset) or (
        not isinstance(eval_dataset, dict) and data_vision.is_vision_dataset(eval_dataset)) or (
        isinstance(eval_dataset, dict) and any(data_vision.is_vision_dataset(d) for d in eval_dataset.values()))
    processor = data_vision.is_vision_processor(processing_class)
    if has_images and not processor:
        raise UserError("The dataset has an 'images'/'image' column but the processing class is a tokenizer, not an "
                        "image processor: give a vision-language model (e.g. posttrain/tiny-llava) and its "
                        "AutoProcessor, or drop the image column.")
    if processor and (getattr(trainer_cls, "vision_data", None) is None
                      or getattr(trainer_cls, "tokenize_jointly", False)):  # reward models score whole texts
        raise UserError(f"{trainer_cls.__name__} does not take vision-language models yet; SFT, DPO, GRPO and RLOO "
                        "do.")
    return processor


def setup(trainer, model, processing_class, args, peft_config):
    """Options that change for images; returns the peft_config to use (LoRA kept on the language model)."""
    if getattr(args, "padding_free", False):
        logger.info("padding_free is off for images: each row's images must stay with its own tokens.")
        args.padding_free = False
    if getattr(args, "packing", False):
        raise UserError("packing=True cannot be used with images (each row's images must stay with its tokens); "
                        "set packing=False.")
    args.packed_attention = False  # its packed rows would mix the rows' image features
    if peft_config is not None and getattr(peft_config, "exclude_modules", None) is None:
        peft_config.exclude_modules = VISION_MODULES  # the vision tower has q_proj/v_proj/fc1 layers too
    return peft_config


def freeze(model, args) -> None:
    """The freeze_vision_tower option: refused for text models, applied to VLMs."""
    if not getattr(args, "freeze_vision_tower", False):
        return
    if not model_vision.is_vision_model(model):
        raise UserError("freeze_vision_tower=True needs a vision-language model; this model has no vision tower.")
    count = model_vision.freeze_vision_tower(model)
    logger.info("freeze_vision_tower: %d vision parameters frozen.", count)


def prepare_datasets(trainer, train_dataset, eval_dataset, processor, args):
    kind = type(trainer).vision_data
    if kind == "sft":
        def prepare(dataset, name):
            return data_vision.prepare_vision_sft_dataset(dataset, processor, args, name)
    elif kind == "preference":
        def prepare(dataset, name):
            return data_vision.prepare_vision_preference_dataset(dataset, processor, args, name,
                                                                 type(trainer).__name__)
    else:
        def prepare(dataset, name):
            return data_vision.prepare_vision_prompts(dataset, processor, args, name)
    return trainer.map_datasets(train_dataset, eval_dataset, prepare)


def collator(trainer, processor, args):
    text = trainer.default_collator(processor.tokenizer, args)
    if text is None:  # online trainers collate prompts themselves
        return None
    repeat = 2 if type(trainer).vision_data == "preference" else 1
    return data_vision.DataCollatorWithImages(text, processor, repeat=repeat)


# ---- online trainers (GRPO, RLOO) ---------------------------------------------------------------------------------
def check_online(trainer) -> None:
    """Image rollouts come from `rollout/vision.py`: refuse what they cannot do."""
    if getattr(trainer, "agent", None) is not None or getattr(trainer, "rollout_func", None) is not None:
        raise UserError("Tool-calling rollouts (tools=, environment_factory=, rollout_func=) do not take images yet; "
                        "drop them or the image column.")
    if getattr(trainer.args, "use_vllm", False):
        raise UserError("use_vllm=True does not take image prompts yet; set use_vllm=False.")


def sample_with_images(trainer, rows: list[dict], starts: list[int], counts: list[int]):
    """The rollout of a generation batch whose prompts hold images; remembers each row's images for the log-prob
    passes of the cycle (`rollout_image_inputs`)."""
    from posttrain.rollout.vision import generate_with_images

    column = data_vision.image_column(list(rows[0]))
    tokens = data_vision.image_tokenizer(trainer.processing_class)
    images = [data_vision.row_images(rows[i], column, f"prompt {i}") for i in starts]
    prompt_ids = [trainer.last_prompt_tokens(data_vision.prompt_ids_with_images(tokens, rows[i]["prompt"], im,
                                                                                f"prompt {i}"))
                  for i, im in zip(starts, images)]
    args = trainer.args
    from posttrain.trainers import distributed

    with trainer.sampling_mode() as policy, distributed.process_seed(trainer.accelerator, args.seed,
                                                                      trainer._micro_step):
        rollout = generate_with_images(policy, trainer.processing_class, prompt_ids, images, counts,
                                       args.max_completion_length, trainer.generation_kwargs())
    trainer._rollout_images = [im for im, n in zip(images, counts) for _ in range(n)]
    rollout.image_index = torch.arange(len(trainer._rollout_images))
    return rollout


def rollout_image_inputs(trainer, batch: dict, model) -> dict:
    """The image tensors of a rollout micro-batch (rows named by its `image_index`), for a log-prob pass."""
    if "image_index" not in batch:
        return {}
    from posttrain.rollout.vision import to_model

    rows = [trainer._rollout_images[i] for i in batch["image_index"].tolist()]
    tokens = data_vision.image_tokenizer(trainer.processing_class)
    return to_model({**tokens.pixel_inputs(rows), **tokens.token_types(batch["input_ids"])}, model)
