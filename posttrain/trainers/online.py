"""`OnlineTrainer`: the rollout machinery every online method (GRPO, RLOO, online DPO, PPO) shares.

Each dataloader item is a *generation batch* of prompt rows (each prompt repeated num_generations times,
consecutively). On the first micro-step of a cycle the base makes one typed `Rollout` (`rollout/types.py`; named,
timed phases: generate, score, old_logps, reference): completions, per-function rewards and their weighted sum,
the group's rewards from every process, and the sampling policy's and reference's log-probs when the method needs
them. A method then writes exactly one hook, `training_batches(rollout)`, that turns it into the micro-batches of
each optimizer step of the cycle (GRPO: group advantages; RLOO: leave-one-out with the KL in the reward; online
DPO: ranked pairs; PPO: values, GAE, whitening, mini-batch epochs), plus its `compute_loss`.

Tool-calling rollouts (`tools=`, `environment_factory=`, `rollout_func=`; trainers with `supports_tools`: GRPO, RLOO,
distillation) come from `rollout/agentic.py` as the same `Rollout`, tool results in the context but outside
`loss_mask`, so no method needs a case of its own; every log-prob, ratio, KL and loss reads the loss mask.

Reduction, one contract: a method's loss is per-item terms and their unit (token, sequence, pair); the base counts
every unit over each optimizer step's micro-batches on all processes (`num_items`) and `reduce_loss` divides, so
the loss is exactly invariant to how a step's batch is split across accumulation steps and processes.

Not here: what code written for TRL reads on a trainer (`trainers/online_inspection.py`), streamed generation
batches and padding (`rollout/batching.py`), generation (`rollout/hf.py`; vLLM colocated or behind
`posttrain vllm-serve`: `rollout/vllm.py`, `rollout/client.py`), rewards (`rewards/`), advantage and loss maths
(`algorithms/`, `losses/`), the reference (`models/reference.py`).
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
from posttrain.data.tokenize import tokenize_prompt
from posttrain.errors import UserError, UserTypeError
from posttrain.losses.reduce import local_reduce, reduce_terms
from posttrain.models import reference, sharding
from posttrain.models.logprobs import completion_logps, positions_from_mask, target_positions
from posttrain.reporting.rollouts import completions_sample, completions_table, print_completions, rollout_metrics
from posttrain.rewards.runner import RewardRunner
from posttrain.rollout.agentic import AGENTIC_ARGUMENTS, agentic_rollouts, custom_rollout
from posttrain.rollout.batching import StreamedGenerationBatches, pad_to_multiple
from posttrain.rollout.engine import vllm_backend
from posttrain.rollout.hf import _eos_ids, generate
from posttrain.rollout.types import Rollout
from posttrain.trainers import distributed, router_loss
from posttrain.trainers import vision as trainer_vision
from posttrain.trainers.base import PostTrainer
from posttrain.trainers.online_inspection import TRLInspection


class OnlineTrainer(TRLInspection, PostTrainer):
    summary_metrics = (("reward", "reward"), ("completions/mean_length", "completion length"))
    needs_reward_funcs = True  # False: reward_funcs may be left out at construction (PPO's loop API scores itself)

    def missing_reward_funcs_message(self) -> str:
        return (f"{type(self).__name__} needs reward_funcs: a function, a built-in name such as 'accuracy_reward', "
                "a 'module:function' path, or a reward-model id.")

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
        if reward_funcs is None:
            reward_funcs = args.reward_funcs
        reward_funcs = _with_reward_model(reward_funcs, args.reward_model_name_or_path)
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
            self.reward_runner.place(self.prepare_frozen, self.accelerator.device)
        self.reference = reference.Reference.build(self, ref_model, model_id)
        self._micro_step = 0
        if train_dataset is not None and not hasattr(train_dataset, "__len__"):
            # a stream is read by `StreamedGenerationBatches` in this process, in order (as TRL requires)
            args.accelerator_config.dispatch_batches = False
            if args.dataloader_num_workers:
                warnings.warn(f"A streamed train dataset is read by one worker to keep its groups together: "
                              f"dataloader_num_workers {args.dataloader_num_workers} → 0.", UserWarning, stacklevel=3)
                args.dataloader_num_workers = 0
        check_vllm_use(args)
        self.use_vllm = args.use_vllm
        self.vllm = vllm_backend(args, self.accelerator, model_id or self.model.config._name_or_path) \
            if args.use_vllm else None
        tags = [tag for tag in ("trl", self.method_name.lower().replace("onlinedpo", "online-dpo"))]
        if hasattr(self.model, "add_model_tags"):  # TRL's model-card tags, on the model as TRL puts them
            self.model.add_model_tags(tags)
        self._buffer: list[dict[str, Any]] = []
        self._last_table: list[dict[str, Any]] = []

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (reference, reward model) placed the way the policy is (`models/sharding.py`)."""
        return sharding.prepare_frozen(self.accelerator, model, self.args)

    # ---- data ---------------------------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):  # text prompts (images: trainers/vision.py)
        for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            if dataset is None or isinstance(dataset, dict):
                continue
            columns = list(dataset.column_names or [])
            if "prompt" not in columns:
                formats.require_type(columns, ("prompt_only",), type(self).__name__)
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                raise UserError(f"The {name} dataset is empty; give at least one prompt.")
        # bad prompts (None, "", ints, messages without a chat template) fail here, not at the first rollout
        return self.map_datasets(train_dataset, eval_dataset,
                                 lambda dataset, name: check_prompts(dataset, tokenizer, name) or dataset)

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

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(N, …) per-row values of this process → (N_all, …) of the whole generation batch in global row order
        (training with several processes; else unchanged)."""
        if self.accelerator.num_processes == 1 or not self.model.training:
            return values
        return self.accelerator.gather(values.contiguous())

    def advantage_batches(self, rollout: Rollout, advantages: torch.Tensor,
                          **extra: torch.Tensor) -> list[list[dict[str, torch.Tensor]]]:
        """Per-completion advantages (N_all,) over the gathered generation batch → this process's rows, shuffled into
        micro-batches grouped into optimizer steps, the same micro-batches for each of the num_iterations passes.
        `extra`: more per-row tensors (N, …) of this process's rows to carry along (e.g. GRPO's sampler weights)."""
        if self.accelerator.num_processes > 1 and self.model.training:
            n = len(rollout.prompts)
            advantages = advantages[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
        rollout.advantages = advantages
        return self.cycle(self.split({**self.rollout_tensors(rollout), "advantages": advantages, **extra}))

    def split(self, batch: dict[str, torch.Tensor], group: int = 1) -> list[dict[str, torch.Tensor]]:
        """One pass over a batch in micro-batches of per_device_train_batch_size rows, shuffled in units of `group`
        consecutive rows (training), or one micro-batch of every row (evaluation)."""
        n = batch["input_ids"].shape[0]
        if not self.model.training:
            return [dict(batch)]
        device = batch["input_ids"].device
        order = torch.randperm(n // group, device=device)
        order = (order.unsqueeze(1) * group + torch.arange(group, device=device)).reshape(-1)
        size = self.args.per_device_train_batch_size
        return [{k: v[order[start:start + size]] for k, v in batch.items()} for start in range(0, n, size)]

    def cycle(self, parts: list[dict[str, torch.Tensor]]) -> list[list[dict[str, torch.Tensor]]]:
        """The micro-batches of one pass, grouped into optimizer steps of gradient_accumulation_steps each and
        repeated for num_iterations passes (one step, one pass in evaluation)."""
        if not self.model.training:
            return [parts]
        ga = self.args.gradient_accumulation_steps
        return [parts[i:i + ga] for i in range(0, len(parts), ga)] * self.args.num_iterations

    # ---- item counts and the reduction --------------------------------------------------------------------
    @staticmethod
    def count_items(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss items of one micro-batch by unit: trained tokens, sequences (rows), ranked pairs."""
        counts = {"token": part["completion_mask"].sum().float(),
                  "sequence": torch.tensor(float(part["completion_mask"].shape[0]),
                                           device=part["completion_mask"].device)}
        if "pair_weight" in part:
            counts["pair"] = part["pair_weight"].sum().float()
        return counts

    def with_item_counts(self, steps: list[list[dict[str, torch.Tensor]]]) -> list[list[dict[str, torch.Tensor]]]:
        """Each micro-batch gets `local_items` (its own counts) and `num_items` (its optimizer step's counts over
        every micro-batch and process: one collective per cycle); the steps are returned. A step of a generation batch
        whose steps_per_generation is not a multiple of gradient_accumulation_steps straddles two cycles: there
        the cycle's count × GA / steps_per_generation stands in for the step's (TRL's normaliser)."""
        args = self.args
        units = sorted(self.count_items(steps[0][0]))
        local = [[self.count_items(part) for part in step] for step in steps]
        totals = torch.stack([torch.stack([sum(c[u] for c in step) for u in units]) for step in local])
        if args.world_size > 1 and self.model.training:
            totals = self.accelerator.reduce(totals, reduction="sum")
        straddles = self.model.training and args.steps_per_generation % args.gradient_accumulation_steps != 0
        if straddles:
            cycle = args.steps_per_generation * args.num_iterations
            totals = totals.sum(0, keepdim=True).expand(len(steps), -1) * args.gradient_accumulation_steps / cycle
        for step, counts, total in zip(steps, local, totals):
            for part, own in zip(step, counts):
                part["local_items"] = own
                part["num_items"] = dict(zip(units, total))
        return steps

    def reduce_loss(self, terms: torch.Tensor, unit: str, inputs: dict[str, Any], local: bool = False):
        """The micro-batch's share of its optimizer step's loss: Σ terms · processes / (the step's `unit` items,
        all micro-batches and processes). local=True: Σ terms / (this micro-batch's items) / GA (TRL's
        per-micro-batch normalisation, for the parity switch). Called directly on one batch (no counts): its own."""
        counts = inputs.get("num_items") or self.count_items(inputs)
        if local:
            own = inputs.get("local_items") or self.count_items(inputs)
            return local_reduce(terms, own[unit], self.args.gradient_accumulation_steps)
        processes = self.accelerator.num_processes if "num_items" in inputs else 1
        return reduce_terms(terms, counts[unit].clamp(min=1), processes)

    def sample(self, rows: list[dict[str, Any]]):
        """This process's completions for its rows of the generation batch (a `Rollout`, rows in order).

        A prompt's consecutive rows share one prefill. With several processes each samples its own slice, under a
        seed of its own (else a group split across processes would get the same samples twice)."""
        args = self.args
        offset = self.accelerator.process_index * len(rows) if self.model.training else 0
        counts = distributed.group_runs(offset, len(rows), self.num_generations)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        if self.rollout_func is not None:  # user code generates (TRL's rollout_func contract)
            return custom_rollout(self.rollout_func, [rows[i]["prompt"] for i in starts], self, counts,
                                  self.processing_class.pad_token_id, _eos_ids(self.model, self.processing_class))
        if self.agent is not None:  # multi-turn: the model calls tools between turns (`rollout/agentic.py`)
            with distributed.process_seed(self.accelerator, args.seed, self._micro_step):
                return self.agent.run(rows, self._generate_turn, args.max_completion_length, args.max_prompt_length)
        if self.uses_images:  # rollouts conditioned on the prompts' images (trainers/vision.py)
            return trainer_vision.sample_with_images(self, rows, starts, counts)
        prompt_ids = [self._prompt_ids(rows[i]["prompt"], rows[i].get("chat_template_kwargs")) for i in starts]
        per_prompt = counts[0] if len(set(counts)) == 1 else counts
        return self.generate_completions(prompt_ids, per_prompt)

    def _generate_turn(self, prompt_ids: list[list[int]], per_prompt, max_new_tokens: int):
        """One turn of a multi-turn rollout: (token ids up to and including EOS, ended with EOS) per row."""
        rollout = self.generate_completions(prompt_ids, per_prompt, max_new_tokens=max_new_tokens, seeded=False)
        lengths = rollout.completion_mask.sum(1).tolist()
        return [(ids[:n].tolist(), not truncated)
                for ids, n, truncated in zip(rollout.completion_ids, lengths, rollout.is_truncated.tolist())]

    def generate_completions(self, prompt_ids: list[list[int]], per_prompt: int | list[int],
                             generation_kwargs: dict[str, Any] | None = None, max_new_tokens: int | None = None,
                             seed_step: int | None = None, seeded: bool = True, model: torch.nn.Module | None = None):
        """A `Rollout` of the policy's completions of tokenised prompts (`per_prompt` each, or one count per
        prompt), sampled in eval mode through the vLLM engine (colocated or a server) when configured, else
        `rollout/hf.py`. Defaults: `generation_kwargs()`, max_completion_length, and the micro-step as the step of
        the per-process seed (seeded=False: no seed of its own). `model`: sample from this frozen model instead of
        the policy (GKD's teacher under seq_kd), always through `rollout/hf.py`."""
        args = self.args
        kwargs = self.generation_kwargs() if generation_kwargs is None else generation_kwargs
        max_new_tokens = args.max_completion_length if max_new_tokens is None else max_new_tokens
        seed_step = self._micro_step if seed_step is None else seed_step
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()
        language_model = self.accelerator.unwrap_model(self.language_model())
        # seeded=False: the caller holds the seed (a multi-turn rollout: one random stream for all its turns)
        seeding = distributed.process_seed(self.accelerator, args.seed, seed_step) if seeded else None
        with seeding or contextlib.nullcontext(), self._gathered_for_generation(language_model):
            if model is not None:
                rollout = generate(self.accelerator.unwrap_model(model), self.processing_class, prompt_ids, per_prompt,
                                   max_new_tokens, kwargs)
            elif self.vllm is not None:  # the engine gets the policy's weights once per optimizer step
                rollout = self.vllm.generate(language_model, self.processing_class, prompt_ids, per_prompt,
                                             max_new_tokens, kwargs, step=self.state.global_step)
            else:
                rollout = generate(language_model, self.processing_class, prompt_ids, per_prompt, max_new_tokens,
                                   kwargs)
        policy.train(was_training)
        return rollout

    def _gathered_for_generation(self, model: torch.nn.Module):
        """ds3_gather_for_generation (DeepSpeed ZeRO-3, transformers generation): the whole weights gathered on
        every process for the rollout (fast decoding); False, or any other setup: generate as placed (ZeRO-3 then
        gathers layer by layer in every forward: slower, less memory)."""
        if (not self.args.ds3_gather_for_generation or self.vllm is not None
                or not any(hasattr(p, "ds_id") for p in model.parameters())):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))

    def _prompt_ids(self, prompt, row_template_kwargs: dict | None = None) -> list[int]:
        """A prompt's ids: conversational prompts rendered with chat_template_kwargs (the config's, updated by the
        row's own `chat_template_kwargs` column, as TRL), then kept to their last max_prompt_length tokens."""
        template_kwargs = {**(getattr(self.args, "chat_template_kwargs", None) or {}), **(row_template_kwargs or {})}
        ids = tokenize_prompt(self.processing_class, prompt, chat_template_kwargs=template_kwargs)
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit else ids

    kl_weight = "beta"  # the config option weighing the KL to the reference (PPO: kl_coef)

    def holds_reference(self) -> bool:
        """Whether reference log-probs are computed (and so a reference is held): the KL weight is > 0."""
        return getattr(self.args, self.kl_weight) > 0

    def no_reference_reason(self) -> str:
        return f"{self.kl_weight} is 0"

    def needs_old_logps(self) -> bool:
        """Sampling-policy log-probs are needed when the policy moves before a rollout is fully used."""
        args = self.args
        return args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps

    # ---- log-probs ------------------------------------------------------------------------------------------
    logps_at_sampling_temperature = True  # False: at temperature 1 (online DPO)
    pack_log_prob_rows = True  # False where the policy's own pass runs padded (PPO): both sides the same arithmetic

    def completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool = False):
        """(logps (B, C), model output dict) of the trained completion tokens (`completion_mask` of the batch: the
        rollout's loss mask) at the sampling temperature (or at 1 where a trainer sets
        `logps_at_sampling_temperature = False`); 0 on every other column. With `with_entropy`, out["entropy_columns"]
        (B, C) holds the entropy at the same columns (0 elsewhere).

        Columns that carry no target (tool results of a multi-turn rollout, padding) may sit anywhere in the
        completion: the log-prob pass returns the kept positions only, and they are put back at their columns.
        position_ids follow the attention mask so left-padded prompts see the positions generation gave them."""
        completion_mask = batch["completion_mask"]
        B, C = completion_mask.shape
        prompt_len = batch["input_ids"].shape[1] - C
        labels = batch["input_ids"].clone()
        labels[:, :prompt_len] = -100
        labels[:, prompt_len:][completion_mask == 0] = -100
        position_ids = positions_from_mask(batch["attention_mask"])
        out = completion_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                       "position_ids": position_ids, "labels": labels,
                                       **trainer_vision.rollout_image_inputs(self, batch, model)},
                               temperature=self.args.temperature if self.logps_at_sampling_temperature else 1.0,
                               with_entropy=with_entropy, shared_prefix=prompt_len,
                               pack_rows=self.pack_log_prob_rows)
        columns = target_positions(labels) + 1 - prompt_len  # the completion column of each kept position
        logps = out["logps"].new_zeros(B, C)
        logps[:, columns] = out["logps"]
        if with_entropy:
            entropy = out["logps"].new_zeros(out["mask"].shape, dtype=torch.float32)
            entropy = entropy.masked_scatter(out["mask"], out["entropy"].float())
            out["entropy_columns"] = entropy.new_zeros(B, C)
            out["entropy_columns"][:, columns] = entropy
        return logps, out

    @torch.no_grad()
    def _batched_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.args.per_device_train_batch_size
        chunks = []
        for start in range(0, batch["input_ids"].shape[0], size):
            part = {k: batch[k][start:start + size] for k in ("input_ids", "attention_mask", "completion_mask",
                                                              "image_index") if k in batch}
            chunks.append(self.completion_logps(model, part)[0])
        return torch.cat(chunks)

    # ---- metrics ------------------------------------------------------------------------------------------------
    def _record_rollout(self, rollout: Rollout) -> None:
        self.record_metrics(rollout_metrics(rollout, self.reward_runner, self.num_generations))
        self.add_tokens_seen(rollout.attention_mask.sum())
        if self.args.log_completions:
            names = self.reward_runner.names if self.reward_runner is not None else []
            self._last_table = completions_table(rollout, names, self.state.global_step)
        names = self.reward_runner.names if self.reward_runner is not None else []
        self._last_rollout_log = {"prompt": list(rollout.prompts), "completion": list(rollout.completions),
                                  "rewards": {name: rollout.rewards[:, k].tolist() for k, name in enumerate(names)},
                                  "advantages": [] if rollout.advantages is None else rollout.advantages.tolist(),
                                  "extra": dict(rollout.logged_columns), "images": []}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._last_table and self.is_world_process_zero() and hasattr(self.args, "num_completions_to_print"):
            # TRL prints a sample of the last rollout at each logging step (GRPO, RLOO)
            print_completions(completions_sample(self._last_table, self.args.num_completions_to_print,
                                                 self.args.log_unique_prompts), self.state.global_step)
        if self._last_table and self.is_world_process_zero():
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


def _with_reward_model(reward_funcs, reward_model: str | None) -> list:
    """reward_funcs as a list, with the config's reward model (the CLI's --reward_model_name_or_path) appended."""
    funcs = as_list(reward_funcs)
    if reward_model and reward_model not in funcs:
        funcs.append(reward_model)
    return funcs

