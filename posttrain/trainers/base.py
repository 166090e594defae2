"""`PostTrainer`: the one base every posttrain trainer extends, over `transformers.Trainer`.

Lives here: model from a name or an object, tokenizer as `processing_class` (loaded from the model when absent,
pad-token fallback), legacy call forms, PEFT wrapping, dropout switch-off, the default output directory, the
metrics store (token-weighted sums, reduced across processes once per log), global loss normalisers, an early
check that output_dir can be written, and the resolved config written to output_dir (after the first step, so a
run that fails at once leaves an earlier run's files as they were).

Not here: losses (`losses/`), data preparation (`data/`), anything specific to one method (its own module), run
reports (`reporting/`: attached here in one line; the model card is written by `save_model`), reliability
(mixins: crash-safe checkpoints and resuming in `checkpoints.py`, Ctrl-C/SIGTERM in `interrupt.py`, skipped
non-finite steps and the refusal to save non-finite weights in `numerics.py`).
Subclasses override `compute_loss` (and online trainers their rollout step) and little else.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import defaultdict
from typing import Any

import datasets
import torch
import yaml
from transformers import PreTrainedModel, Trainer, TrainerCallback

from posttrain import compat, reporting
from posttrain.configs.base import PostTrainConfig
from posttrain.errors import UserError
from posttrain.models import adapters, lean_layers, loading, sharding
from posttrain.models.logprobs import batch_labels, lm_head_chunking
from posttrain.models.packed_attention import use_packed_attention
from posttrain.trainers import router_loss
from posttrain.trainers import vision as trainer_vision
from posttrain.trainers.checkpoints import CrashSafeCheckpoints
from posttrain.trainers.interrupt import GracefulInterrupt
from posttrain.trainers.numerics import NonFiniteGuard

logger = logging.getLogger(__name__)


GRADIENT_CHECKPOINTING_NOTE = (
    "gradient_checkpointing is off (TRL turns it on by default): posttrain keeps activations and recomputes no "
    "layer, which is faster per step; set gradient_checkpointing=True to trade step time for activation memory "
    "(figures: benchmarks/GRADIENT-CHECKPOINTING.md).")


class PostTrainer(CrashSafeCheckpoints, GracefulInterrupt, NonFiniteGuard, Trainer):
    config_class: type[PostTrainConfig] = PostTrainConfig
    method_name = "PostTrain"  # used for the default output dir and the model card
    # Model card / Hub tags: "posttrain" and the method tag TRL writes ("sft", "dpo", "reward-trainer", …), not
    # "trl": the model was not trained with TRL, and the Hub's "trl" tag says it was.
    _tag_names: list[str] | None = None  # None: ["posttrain", method_name.lower()]
    requires_train_dataset = False  # True: train_dataset=None is an error at once (as in TRL), not at train()
    accepts_compute_loss_func = False  # True: compute_loss applies `compute_loss_func(outputs, labels, ...)`
    auto_model_class = None  # None = AutoModelForCausalLM
    default_model_init_kwargs: dict[str, Any] = {}  # e.g. num_labels=1 for reward models
    summary_metrics = (("loss", "loss"), ("mean_token_accuracy", "token accuracy"))  # CLI's closing line
    loss_is_scaled_for_ga = True  # compute_loss divides by the global item count of the accumulated batch

    def __init__(self, model: PreTrainedModel | str, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_loss_func=None, optimizer_cls_and_kwargs=None, quantization_config=None, **kwargs: Any):
        name = type(self).__name__
        args, processing_class = compat.resolve_trainer_arguments(name, self.config_class, args, processing_class,
                                                                  kwargs)
        if compute_loss_func is not None and not self.accepts_compute_loss_func:
            raise UserError(f"{name} does not take compute_loss_func (its loss is not a function of the model "
                            f"outputs and labels alone); subclass {name} and override compute_loss instead.")
        if isinstance(train_dataset, datasets.IterableDataset):
            # accelerate's dispatching would concatenate batches of every process from process 0's stream
            args.accelerator_config.dispatch_batches = False
        if not getattr(args, "_output_dir_was_default", False):
            check_output_dir(args.output_dir)  # before loading the model: fail in seconds, not minutes
        if isinstance(model, str):
            init_kwargs = {**self.default_model_init_kwargs, **(args.model_init_kwargs or {})}
            if args.trust_remote_code:
                init_kwargs.setdefault("trust_remote_code", True)
            if quantization_config is not None:
                if "quantization_config" in init_kwargs:
                    raise UserError("quantization_config is given both to the trainer and in "
                                    "args.model_init_kwargs; give it once (preferably to the trainer).")
                init_kwargs["quantization_config"] = loading.check_quantization_config(quantization_config)
            model = loading.load_pretrained_model(model, self.auto_model_class, **init_kwargs)
        elif quantization_config is not None:
            raise UserError("quantization_config applies when the model is given by name; this model is already "
                            "loaded. Pass its name instead, or load it quantized yourself and drop "
                            "quantization_config.")
        elif args.model_init_kwargs:
            logger.warning("model_init_kwargs is ignored because the model is already loaded.")
        if self.auto_model_class is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise UserError(f"{name} trains decoder-only language models and {type(model).__name__} is an "
                            "encoder-decoder model (T5, BART, …): pass a causal LM (AutoModelForCausalLM).")
        if train_dataset is None and self.requires_train_dataset:  # after the model/output checks of older forms
            raise UserError(f"`train_dataset` is required: {name} needs a training dataset.")
        if processing_class is None:  # a VLM's processor, else the tokenizer
            remote = {"trust_remote_code": True} if args.trust_remote_code else {}
            processing_class = (trainer_vision.load_processing_class(model)
                                or loading.load_tokenizer(model.config._name_or_path, **remote))
        loading.prepare_tokenizer(processing_class, getattr(args, "eos_token", None),
                                  getattr(args, "pad_token", None), getattr(args, "chat_template_path", None))
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = getattr(getattr(processing_class, "tokenizer", processing_class),
                                                "pad_token_id", None)
        # images (trainers/vision.py): a VLM processor switches datasets, collator and a few options to images
        self.uses_images = trainer_vision.uses_images(type(self), processing_class, train_dataset, eval_dataset, args,
                                                       data_collator)
        if self.uses_images:
            peft_config = trainer_vision.setup(self, model, processing_class, args, peft_config)
        given_adapter = adapters.is_peft_model(model) and peft_config is None
        if peft_config is not None:
            model = adapters.wrap(model, peft_config, args.gradient_checkpointing)
        if args.disable_dropout:
            loading.disable_dropout(model)
        trainer_vision.freeze(model, args)
        if getattr(args, "_output_dir_was_default", False):
            args.output_dir = f"{loading.model_short_name(model)}-{self.method_name}"
            check_output_dir(args.output_dir)
        if self.uses_images:
            train_dataset, eval_dataset = trainer_vision.prepare_datasets(self, train_dataset, eval_dataset,
                                                                          processing_class, args)
            data_collator = data_collator or trainer_vision.collator(self, processing_class, args)
        else:
            train_dataset, eval_dataset = self.prepare_datasets(train_dataset, eval_dataset, processing_class, args)
        if data_collator is None:
            data_collator = self.default_collator(processing_class, args)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                             "eval": defaultdict(lambda: [0.0, 0.0])}
        self._num_tokens, self._new_tokens = 0.0, 0.0
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self._prepared_eval = _by_id(self.eval_dataset)  # evaluate(eval_dataset=raw) prepares anything else
        self.router_aux_loss_coef, self.aux_loss_enabled = router_loss.setup(self.model, args)
        self._router_losses = router_loss.RouterLosses(self.model) if self.aux_loss_enabled else None
        if args.activation_offloading and self.args.device.type == "cpu":
            raise UserError("activation_offloading moves saved activations from the GPU to CPU memory; this run "
                            "trains on the CPU, where they already are. Remove activation_offloading.")
        if not args.gradient_checkpointing:
            note_trl_difference("gradient_checkpointing", GRADIENT_CHECKPOINTING_NOTE)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self.tag_names())  # pushed to the Hub with the model, as TRL's are
        if getattr(args, "lean_layers", False) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            lean_layers.apply_lean_layers(self.model)  # fewer saved activations (models/lean_layers.py)
        if getattr(args, "packed_attention", False):
            use_packed_attention(self.model)  # packed rows without a dense mask (models/packed_attention.py)
        self.run_config_extra: dict[str, Any] = {}  # the CLI adds model/data options here
        self.add_callback(_RunConfigWriter(self))
        if given_adapter and self.holds_reference():
            adapters.add_reference_adapter(model)  # the adapter as given is the reference (models/adapters.py)
        reporting.attach(self)  # metrics.jsonl, plots, report.html, concise progress bar

    # ---- hooks for subclasses -----------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, processing_class, args):
        """Raw → model-ready datasets (eval may be a dict of datasets). Default: unchanged."""
        return train_dataset, eval_dataset

    @staticmethod
    def map_datasets(train_dataset, eval_dataset, prepare):
        """Apply `prepare(dataset, name)` to the train set and to the eval set (or each of a dict of eval sets)."""
        if train_dataset is not None:
            train_dataset = prepare(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare(v, f"eval {k}") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare(eval_dataset, "eval")
        return train_dataset, eval_dataset

    vision_data: str | None = None  # the image pipeline this trainer's data takes (trainers/vision.py); None: none

    reference = None  # `models.reference.Reference`, built once by trainers that hold one

    def holds_reference(self) -> bool:
        """The one question "is there a reference": whether this run computes reference log-probs (then a given
        adapter also gets a frozen reference copy)."""
        return False

    def no_reference_reason(self) -> str:
        """Why `holds_reference()` is False, for the error when a reference is given anyway."""
        return f"{type(self).__name__} has no reference"

    @property
    def ref_model(self):
        """The frozen reference model (None: none held, the PEFT base is the reference, or log-probs were
        precomputed)."""
        return self.reference.model if self.reference is not None else None

    @ref_model.setter
    def ref_model(self, model) -> None:
        if self.reference is not None:
            self.reference.model = model

    def default_collator(self, processing_class, args):
        """The collator used when none is given. Default: transformers' default."""
        return None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if sharding.fsdp_on_cpu(self.accelerator):  # an FSDP2 launch on CPU processes (models/sharding.py)
            self.is_fsdp_enabled = True

    def compute_loss_context_manager(self):
        """transformers' context around each compute_loss, plus the `chunked_lm_head` setting for the log-prob
        passes inside it (`models/logprobs.py`), so no trainer threads it through its own calls."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(lm_head_chunking(getattr(self.args, "chunked_lm_head", "auto")))
        if self.args.activation_offloading and self.model.training:
            # tensors saved for the backward go to (pinned) CPU memory and come back when the backward needs them
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    def __init_subclass__(cls, **kwargs):
        """Every subclass's own `compute_loss` gets the MoE router loss added (`router_loss.py`): trainers write
        their method's loss only."""
        super().__init_subclass__(**kwargs)
        if "compute_loss" in cls.__dict__:
            cls.compute_loss = router_loss.with_router_loss(cls.__dict__["compute_loss"])

    def _remove_unused_columns(self, dataset, description: str | None = None):
        """transformers' column pruning, except for a `with_transform` dataset (its rows are what the transform
        returns, so the stored columns it reads must stay) and an image run's `images` column."""
        if isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom":
            return dataset
        if getattr(self, "uses_images", False):  # the collator turns the images column into pixel values
            self._set_signature_columns_if_needed()
            if "images" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "images"]
        return super()._remove_unused_columns(dataset, description)

    # ---- evaluation on a dataset given late ------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """transformers' evaluate; an `eval_dataset` given here is prepared (tokenised, truncated, …) as the one
        given to the constructor was."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self.prepare_eval_dataset(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prepare_eval_dataset(self, eval_dataset):
        """A raw eval dataset (or dict of them) given after construction, prepared like the constructor's; datasets
        already prepared by this trainer unchanged."""
        if isinstance(eval_dataset, dict):
            return {k: self.prepare_eval_dataset(v) for k, v in eval_dataset.items()}
        if self._prepared_eval.get(id(eval_dataset)) is eval_dataset:
            return eval_dataset
        _, prepared = self.prepare_datasets(None, eval_dataset, self.processing_class, self.args)
        self._prepared_eval.update(_by_id(prepared))
        return prepared

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """TRL's call form: write the model card (README.md in output_dir), with `tags` added to this trainer's."""
        if self.is_world_process_zero():
            extra = [tags] if isinstance(tags, str) else list(tags or [])
            reporting.write_model_card(self, self.args.output_dir, tags=[*self.tag_names(), *extra])

    def tag_names(self) -> list[str]:
        """The model card and Hub tags of this trainer's models."""
        return list(self._tag_names or ["posttrain", self.method_name.lower()])

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """transformers' warnings after loading a checkpoint, without the expected one: a tied LM head is not saved
        (it is the embedding), so "missing keys ['lm_head.weight']" on every resume said nothing; re-tie instead."""
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in load_result.missing_keys if k.split("base_model.model.")[-1] not in tied]
        if tied and len(missing) < len(load_result.missing_keys) and hasattr(model, "tie_weights"):
            model.tie_weights()
        load_result = type("LoadResult", (), {"missing_keys": missing,
                                              "unexpected_keys": list(load_result.unexpected_keys)})()
        super()._issue_warnings_after_load(load_result)

    # ---- loss normalisation ------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' forward and backward of one micro-batch, or — with `max_tokens_per_backward`, where a config
        has it — one per slice that `backward_slices` cuts (`trainers/slices.py`): the same gradient, one slice's
        activations in memory at a time. Returns the micro-batch's loss."""
        budget = getattr(self.args, "max_tokens_per_backward", None)
        parts = None if budget is None else self.backward_slices(inputs, budget)
        step = super().training_step
        if parts is None:
            return step(model, inputs, num_items_in_batch)
        return sum(step(model, part, num_items_in_batch) for part in parts)

    def backward_slices(self, inputs, budget: int) -> list | None:
        """The slices of a micro-batch of at most `budget` tokens each, or None to run it whole (the default)."""
        return None

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor:
        """Loss items in one micro-batch (default: trained target tokens). Subclasses count pairs, sequences…"""
        return (batch["labels"][..., 1:] != -100).sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Global item count of the accumulated batch: all micro-batches, summed over processes."""
        if not batch_samples:
            return None
        count = sum(self.count_loss_items(b) for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    # ---- metrics -----------------------------------------------------------------------------------------------
    def record_metrics(self, metrics: dict[str, torch.Tensor | float], weight: float = 1.0) -> None:
        """Add weighted values to the store; `log` reports sum(value*weight)/sum(weight) over all processes."""
        store = self._metrics["train" if self.model.training else "eval"]
        for key, value in metrics.items():
            entry = store[key]
            entry[0] += float(value) * weight
            entry[1] += weight

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._metrics[mode]
        names = sorted(store)
        # one collective per log: every metric's (sum, weight) plus the tokens seen since the last log
        rows = [store[n] for n in names] + [[self._new_tokens, 1.0]]
        totals = torch.tensor(rows, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        totals = totals.tolist()
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + n: s / w for n, (s, w) in zip(names, totals) if w > 0})
        store.clear()
        if mode == "train":
            self._num_tokens += totals[-1][0]
            self._new_tokens = 0.0
            if self._num_tokens:
                logs["num_tokens"] = self._num_tokens
        super().log(logs, start_time)

    def add_tokens_seen(self, count: torch.Tensor | int) -> None:
        """Count input tokens on this process; `log` sums them over processes into `num_tokens`."""
        self._new_tokens += float(count)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Without compute_metrics nobody reads logits: skip collecting (B, T, V) tensors during eval.
        if self.compute_metrics is None:
            prediction_loss_only = True
        if "labels" not in inputs and "completion_mask" in inputs:  # TRL's preference batches: transformers computes
            inputs = {**inputs, "labels": batch_labels(inputs)}  # the loss only for batches that carry label_names
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ---- run records ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            reporting.write_model_card(self, output_dir)  # README.md next to the weights

    def save_run_config(self, path: str | None = None) -> str:
        """Write the resolved config (trainer options plus any CLI model/data options) as YAML."""
        path = path or os.path.join(self.args.output_dir, "config.yaml")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        record = {**self.run_config_extra, **self.args.to_flat_dict()}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(record, f, sort_keys=True)
        os.replace(tmp, path)
        return path


class _RunConfigWriter(TrainerCallback):
    """Writes output_dir/config.yaml once the first optimizer step of a `train()` call has completed (before any
    checkpoint of the run), so a run that fails at once — a reward function that raises, a bad batch — leaves the
    config.yaml of an earlier run in the same directory untouched."""

    def __init__(self, trainer: PostTrainer):
        self._trainer = weakref.ref(trainer)
        self._pending = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._pending = True

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if self._pending and trainer is not None and trainer.is_world_process_zero():
            trainer.save_run_config()
        self._pending = False


_NOTED: set[str] = set()


def note_trl_difference(key: str, message: str) -> None:
    """Log `message` (a default that differs from TRL's, and why) once per process, at info level."""
    if key not in _NOTED:
        _NOTED.add(key)
        logger.info(message)


def _by_id(dataset) -> dict[int, Any]:
    """A dataset, or the values of a dict of datasets, by identity (which ones a trainer has prepared). The objects
    are held, not only their ids: a freed dataset's id can be reused by a new raw one, which must still be prepared."""
    if dataset is None:
        return {}
    return {id(d): d for d in (dataset.values() if isinstance(dataset, dict) else [dataset])}


def check_output_dir(path: str) -> None:
    """Refuse an output_dir that cannot be created or written, before any work: NotADirectoryError when it or
    a parent is a file, PermissionError when the nearest existing directory is not writable."""
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "it is a file" if existing == target else f"{existing!r} is a file, not a directory"
        raise NotADirectoryError(f"output_dir {path!r} cannot be used: {where}. Choose another output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == target else f"{existing!r} is"
        raise PermissionError(f"output_dir {path!r} is not writable: {where} read-only for this user. Choose a "
                              "directory you can write to, or change its permissions.")
