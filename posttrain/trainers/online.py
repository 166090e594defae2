"""`OnlineTrainer`: the rollout machinery every online method (GRPO, RLOO, online DPO, PPO, distillation) shares.

Each dataloader item is a *generation batch* of prompt rows (each prompt repeated num_generations times,
consecutively). On the first micro-step of a cycle the base makes one typed `Rollout` (`rollout/types.py`; named,
timed phases: generate, score, old_logps, reference): completions, per-function rewards and their weighted sum,
the group's rewards from every process, and the sampling policy's and reference's log-probs when the method needs
them. A method then writes exactly one hook, `training_batches(rollout)`, that turns it into the micro-batches of
each optimizer step of the cycle (GRPO: group advantages; RLOO: leave-one-out with the KL in the reward; online
DPO: ranked pairs; PPO: values, GAE, whitening, mini-batch epochs), plus its `compute_loss`. Tool-calling rollouts
(`rollout/agentic.py`) are the same `Rollout`, tool results outside `loss_mask`, which every loss reads.

Here: construction, data loaders, the cycle, checkpoint state, phases, making and recording the rollout. Mixins:
sampling and log-prob passes (`online_sampling.py`), micro-batches and the one reduction contract
(`online_batches.py`), what code written for TRL reads on a trainer (`online_inspection.py`).

Not here: streamed batches and padding (`rollout/batching.py`), generation (`rollout/`), rewards (`rewards/`),
advantage and loss maths (`algorithms/`, `losses/`), the reference (`models/reference.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from posttrain.configs.online import check_vllm_use
from posttrain.data import formats
from posttrain.data.prepare import check_prompts
from posttrain.errors import UserError, UserTypeError
from posttrain.models import reference, sharding
from posttrain.reporting.rollouts import completions_sample, completions_table, print_completions, rollout_metrics
from posttrain.rewards.runner import RewardRunner
from posttrain.rollout.agentic import AGENTIC_ARGUMENTS, agentic_rollouts
from posttrain.rollout.batching import StreamedGenerationBatches, pad_to_multiple
from posttrain.rollout.engine import vllm_backend
from posttrain.rollout.types import Rollout
from posttrain.trainers import distributed, router_loss
from posttrain.trainers import vision as trainer_vision
from posttrain.trainers.base import PostTrainer
from posttrain.trainers.online_batches import RolloutBatches
from posttrain.trainers.online_inspection import TRLInspection
from posttrain.trainers.online_sampling import RolloutSampling


class OnlineTrainer(TRLInspection, RolloutSampling, RolloutBatches, PostTrainer):
    summary_metrics = (("reward", "reward"), ("completions/mean_length", "completion length"))
    needs_reward_funcs = True  # False: reward_funcs may be left out at construction (PPO's loop API scores itself)

    def missing_reward_funcs_message(self) -> str:
        return (f"No reward source provided: {type(self).__name__} needs reward_funcs: a function, a built-in name "
                "such as 'accuracy_reward', a 'module:function' path, or a reward-model id.")

    supports_tools = False  # True: the trainer takes tools=, environment_factory= and rollout_func= (GRPO, RLOO,
    # DistillationTrainer)
    requires_train_dataset = True  # False where a trainer has another source of prompts (PPO's loop API)
    scores_rollouts = True  # False: completions are not scored (distillation: no reward functions, no score phase)

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, peft_config=None, ref_model=None,
                 **kwargs: Any):
        model_id = model if isinstance(model, str) else None
        agentic = {k: kwargs.pop(k) for k in AGENTIC_ARGUMENTS if k in kwargs}
        if not self.supports_tools and any(v is not None for v in agentic.values()):
            raise UserTypeError(f"{type(self).__name__} does not take {next(iter(agentic))}=: tool-calling rollouts "
                                "are trained by GRPOTrainer, RLOOTrainer and DistillationTrainer.")
        streamed = train_dataset is not None and not hasattr(train_dataset, "__len__")
        accelerator_config = getattr(args, "accelerator_config", None)
        dispatch = (accelerator_config.get("dispatch_batches") if isinstance(accelerator_config, dict)
                    else getattr(accelerator_config, "dispatch_batches", None))
        if streamed and dispatch:
            raise UserError("Iterable datasets require `dispatch_batches=False` (each process reads the stream and "
                            "keeps its slice of every group); remove dispatch_batches from accelerator_config.")
        # TRL's early error, before any model is loaded (ref_model is model: `models/reference.py`)
        if train_dataset is None and self.requires_train_dataset and agentic.get("environment_factory") is None:
            raise UserError(f"`train_dataset` is required: {type(self).__name__} needs the prompts to sample "
                            "completions for (train_dataset=...).")
        super().__init__(model=model, args=args, data_collator=_keep_rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        args = self.args
        self.agent, self.rollout_func = agentic_rollouts(self.processing_class, args, **agentic)
        if self.uses_images:
            trainer_vision.check_online(self)
        reward_funcs = as_list(args.reward_funcs if reward_funcs is None else reward_funcs)
        reward_model = args.reward_model_name_or_path
        if reward_model and reward_model not in reward_funcs:  # the CLI's --reward_model_name_or_path, scored after
            reward_funcs.append(reward_model)
        reward_weights = args.reward_weights
        if self.agent is not None and self.agent.reward_classes:  # environments that score themselves
            reward_weights = reward_weights and list(reward_weights) + [1.0] * len(self.agent.reward_classes)
            reward_funcs = reward_funcs + self.agent.environment_rewards()
        if not reward_funcs and self.needs_reward_funcs:
            raise UserError(self.missing_reward_funcs_message())
        self.reward_runner = None
        if reward_funcs:
            self.reward_runner = RewardRunner(reward_funcs, reward_weights, reward_processing_classes)
            # reward models sit beside the policy as it is placed: sharded under ZeRO-3/FSDP, else on its device
            self.reward_runner.place(lambda m: sharding.prepare_frozen(self.accelerator, m, args),
                                     self.accelerator.device)
        self.reference = reference.Reference.build(self, ref_model, model_id)
        self._micro_step = 0
        if streamed and args.dataloader_num_workers:  # (dispatch_batches is off for a stream: trainers/base.py)
            warnings.warn(f"A streamed train dataset is read by one worker to keep its groups together: "
                          f"dataloader_num_workers {args.dataloader_num_workers} → 0.", UserWarning, stacklevel=3)
            args.dataloader_num_workers = 0
        check_vllm_use(args)
        self.use_vllm = args.use_vllm
        self.vllm = vllm_backend(args, self.accelerator, model_id or self.model.config._name_or_path) \
            if args.use_vllm else None
        if hasattr(self.model, "add_model_tags"):  # TRL's model-card tags, on the model as TRL puts them
            self.model.add_model_tags(["trl", self.method_name.lower().replace("onlinedpo", "online-dpo")])
        self._buffer: list[dict[str, Any]] = []
        self._last_table: list[dict[str, Any]] = []

    def train(self, *args: Any, **kwargs: Any):
        if self.reward_runner is None and self.scores_rollouts:  # PPO built for its loop API: before any setup
            raise UserError(self.missing_reward_funcs_message())
        return super().train(*args, **kwargs)

    # ---- data ---------------------------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):  # text prompts (images: trainers/vision.py)
        def checked(dataset, name: str):
            columns = list(dataset.column_names or [])
            if "prompt" not in columns:
                formats.require_type(columns, ("prompt_only",), type(self).__name__)
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                raise UserError(f"The {name} dataset is empty; give at least one prompt.")
            # bad prompts (None, "", ints, messages without a chat template) fail here, not at the first rollout
            return check_prompts(dataset, tokenizer, name) or dataset

        return self.map_datasets(train_dataset, eval_dataset, checked)

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        G = args.num_generations
        # The sampler walks *global* generation batches (every process's rows); accelerate deals each process its
        # own consecutive slice of generation_batch_size rows, so a group of G may span processes.
        unique = args.generation_batch_size * self.accelerator.num_processes // G
        if not hasattr(self.train_dataset, "__len__"):  # a streamed dataset (datasets.IterableDataset)
            batches = StreamedGenerationBatches(self.train_dataset, G, unique, args.generation_batch_size,
                                                args.num_iterations * args.steps_per_generation,
                                                self.accelerator.process_index)
            return DataLoader(batches, batch_size=None, collate_fn=_keep_rows, num_workers=0)
        if len(self.train_dataset) < unique:
            raise UserError(f"The train dataset has {len(self.train_dataset)} prompts but one generation batch "
                            f"needs {unique}; add prompts or lower per_device_train_batch_size/steps_per_generation.")
        sampler = distributed.RepeatSampler(len(self.train_dataset), G, unique,
                                            args.num_iterations * args.steps_per_generation, args.shuffle_dataset,
                                            args.seed)
        loader = DataLoader(self.train_dataset, batch_size=args.generation_batch_size, sampler=sampler,
                            collate_fn=_keep_rows, num_workers=args.dataloader_num_workers)
        return self.accelerator.prepare(loader)

    @property
    def num_generations(self) -> int:
        """The group size of the rollout being made: num_generations in training, num_generations_eval (where the
        config has it and it is set) in evaluation."""
        args = self.args
        if self.model is not None and not self.model.training:
            return getattr(args, "num_generations_eval", None) or args.num_generations
        return args.num_generations

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """Eval prompts, each repeated num_generations_eval (default num_generations) times, in order; one rollout
        per eval batch."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        G = getattr(self.args, "num_generations_eval", None) or self.args.num_generations
        unique = max(self.args.per_device_eval_batch_size // G, 1)
        if not hasattr(dataset, "__len__"):  # a streamed eval set: every prompt once, in stream order
            batches = StreamedGenerationBatches(dataset, G, unique, unique * G, 1, keep_partial=True)
            return DataLoader(batches, batch_size=None, collate_fn=_keep_rows, num_workers=0)
        sampler = distributed.RepeatSampler(len(dataset), G, 1, 1, shuffle=False, seed=self.args.seed)
        loader = DataLoader(dataset, batch_size=unique * G, sampler=sampler, collate_fn=_keep_rows, num_workers=0)
        return self.accelerator.prepare(loader)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Generate and score the eval prompts (rewards, lengths go to the eval metrics) and report the loss."""
        batch = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def _get_num_items_in_batch(self, batch_samples, device):
        return None  # the global normaliser is known only after generation: each micro-batch carries num_items

    # ---- checkpoints --------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Adds the micro-step counter and the rollout buffer: a run resumed mid-cycle trains on the same
        completions instead of generating new ones (the RNG states transformers saves cover the next rollouts)."""
        return {**super().checkpoint_state(), "micro_step": self._micro_step, "buffer": self._buffer}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._micro_step = int(state.get("micro_step", 0))
        self._buffer = list(state.get("buffer", []))

    # ---- phases ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        with torch.profiler.record_function(f"phase:{name}"):  # names the phase in a profile (profile_step.py)
            yield
        self.record_metrics({f"timing/{name}": time.perf_counter() - start})

    def _prepare_inputs(self, rows):
        if not isinstance(rows, list):  # already a prepared micro-batch (e.g. called twice)
            return rows
        if not self.model.training:
            return self._cycle_batches(rows)[0]
        cycle = self.args.steps_per_generation * self.args.num_iterations
        if self._micro_step % cycle == 0:
            self._buffer = self._cycle_batches(rows)
        batch = self._buffer[self._micro_step % cycle]
        self._micro_step += 1
        return batch

    def generation_kwargs(self) -> dict[str, Any]:
        args = self.args
        # top_k 0 is passed as such: transformers' `generate` fills an unset top_k with 50
        kwargs = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                      min_p=args.min_p, repetition_penalty=args.repetition_penalty)
        if args.cache_implementation is not None and not args.use_vllm:
            kwargs["cache_implementation"] = args.cache_implementation
        kwargs.update(args.generation_kwargs or {})
        return {k: v for k, v in kwargs.items() if v is not None}

    def _cycle_batches(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One generation batch → the micro-batches of its whole cycle (every pass), each carrying its optimizer
        step's global item counts."""
        with router_loss.router_logits_off(self.accelerator.unwrap_model(self.model)):  # MoE: no loss reads them
            rollout = self.make_rollout(rows)
            steps = self.with_item_counts(self.training_batches(rollout))
        self._record_rollout(rollout)
        return [part for step in steps for part in step]

    # ---- the rollout ----------------------------------------------------------------------------------------
    def make_rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Generate, decode, score; the sampling policy's and the reference's log-probs when needed."""
        args, tok = self.args, self.processing_class
        device = args.device
        if self.reward_runner is None and self.scores_rollouts:
            raise UserError(self.missing_reward_funcs_message())
        with self.phase("generate"):
            rollout = self.sample(rows)
        length = int(rollout.completion_mask.sum(1).max().clamp(min=1))
        rollout.completion_ids = rollout.completion_ids[:, :length].to(device)
        rollout.completion_mask = rollout.completion_mask[:, :length].to(device)
        rollout.prompt_ids, rollout.prompt_mask = rollout.prompt_ids.to(device), rollout.prompt_mask.to(device)
        rollout.is_truncated = rollout.is_truncated.to(device)
        # the trained tokens: every completion token, or (multi-turn) the model's own, never a tool result
        rollout.loss_mask = rollout.loss_mask[:, :length].to(device) * rollout.completion_mask  # ⊆ the completion
        if rollout.sampler_logps is not None:
            rollout.sampler_logps = rollout.sampler_logps[:, :length].to(device)
        pad_to_multiple(rollout, getattr(args, "pad_to_multiple_of", None),
                        getattr(tok, "tokenizer", tok).pad_token_id)  # a VLM processor holds its tokenizer
        if getattr(args, "mask_truncated_completions", False):  # GRPO and RLOO take this option
            rollout.loss_mask = rollout.loss_mask * (~rollout.is_truncated).unsqueeze(1)
        if not rollout.prompts:  # a multi-turn rollout keeps the prompts its environments extended
            rollout.prompts = [r["prompt"] for r in rows]
        rollout.columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        if not rollout.completions:  # a multi-turn rollout's are message lists with the tool turns already
            texts = tok.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            conversational = isinstance(rows[0]["prompt"], list)
            rollout.completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        if self.scores_rollouts:
            self.score(rollout)
        self.add_logps(rollout)
        return rollout

    def score(self, rollout: Rollout) -> None:
        """Rewards of every completion (one column per function), their weighted sum, and the generation batch's."""
        device = self.args.device
        ids_lists = [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
        with self.phase("score"):
            rollout.rewards = self.reward_runner(rollout.prompts, rollout.completions, ids_lists, rollout.columns,
                                                 trainer_state=self.state, **rollout.reward_kwargs).to(device)
            rollout.scores = self.reward_runner.weighted_sum(rollout.rewards)
            rollout.logged_columns = dict(self.reward_runner.logged_columns)  # log_extra: completions table
            self.record_metrics({name: sum(values) / len(values)  # log_metric: the functions' own metrics
                                 for name, values in self.reward_runner.logged_metrics.items() if values})
            if torch.isnan(rollout.scores).all():
                raise UserError(f"No reward function scored any of the {len(ids_lists)} completions of this batch "
                                f"(every one returned None or NaN: {', '.join(self.reward_runner.names)}); check that "
                                "they read the dataset's columns, or add a reward function that applies to this data.")
            # group statistics need every member of a group, which may sit on another process
            rollout.group_rewards = self.gather_rows(rollout.rewards)

    def add_logps(self, rollout: Rollout) -> None:
        """The sampling policy's log-probs (when the method needs them) and the reference's (when it holds one)."""
        batch = self.rollout_tensors(rollout)
        if self.needs_old_logps():
            with self.phase("old_logps"):
                rollout.old_logps = self._batched_logps(self.model, batch)
        if self.reference is not None:
            with self.phase("reference"), self.reference.context(self.language_model()) as ref:
                rollout.ref_logps = self._batched_logps(ref, batch)

    def language_model(self) -> torch.nn.Module:
        """The causal LM that samples and has a reference (PPO's is inside its policy-and-critic container)."""
        return self.model

    @staticmethod
    def rollout_tensors(rollout: Rollout) -> dict[str, torch.Tensor]:
        """The rollout as one training batch: input_ids, attention_mask (N, P + C), completion_mask (N, C; the
        trained tokens) and old_logps / ref_logps / sampler_logps (N, C) when present."""
        batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                 "completion_mask": rollout.loss_mask}
        for key in ("old_logps", "ref_logps", "sampler_logps", "image_index"):
            if getattr(rollout, key) is not None:
                batch[key] = getattr(rollout, key)
        return batch

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """The method's one hook: a scored rollout → the micro-batches of each optimizer step of the cycle (every
        pass over the rollout), as a list of steps, each a list of micro-batches (dicts of (B, …) tensors).
        Set `rollout.advantages` (N,) for the completions table."""
        raise NotImplementedError

    kl_weight = "beta"  # the config option weighing the KL to the reference (PPO: kl_coef)

    def holds_reference(self) -> bool:
        """Whether reference log-probs are computed (and so a reference is held): the KL weight is > 0."""
        return getattr(self.args, self.kl_weight) > 0

    def no_reference_reason(self) -> str:
        return f"{self.kl_weight} is 0"

    uses_old_logps: bool | None = None  # True/False: the method always/never needs them; None: the base decides

    def needs_old_logps(self) -> bool:
        """Sampling-policy log-probs are needed when the policy moves before a rollout is fully used."""
        if self.uses_old_logps is not None:
            return self.uses_old_logps
        args = self.args
        return args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps

    # ---- metrics ------------------------------------------------------------------------------------------------
    def _record_rollout(self, rollout: Rollout) -> None:
        self.record_metrics(rollout_metrics(rollout, self.reward_runner, self.num_generations))
        self.add_tokens_seen(rollout.attention_mask.sum())
        names = self.reward_runner.names if self.reward_runner is not None else []
        if self.args.log_completions:
            self._last_table = completions_table(rollout, names, self.state.global_step)
        self._last_rollout_log = {"prompt": list(rollout.prompts), "completion": list(rollout.completions),
                                  "rewards": {name: rollout.rewards[:, k].tolist() for k, name in enumerate(names)},
                                  "advantages": [] if rollout.advantages is None else rollout.advantages.tolist(),
                                  "extra": dict(rollout.logged_columns), "images": []}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._last_table and self.is_world_process_zero():
            if hasattr(self.args, "num_completions_to_print"):  # TRL prints a sample at each log (GRPO, RLOO)
                print_completions(completions_sample(self._last_table, self.args.num_completions_to_print,
                                                     self.args.log_unique_prompts), self.state.global_step)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "completions.jsonl"), "a") as f:
                for row in self._last_table:
                    f.write(json.dumps(row, default=str) + "\n")
            self._last_table = []


def _keep_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


def as_list(value) -> list:
    """None, one entry, or a list/tuple of entries (reward functions, EOS ids) as a new list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
