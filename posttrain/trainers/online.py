"""`OnlineTrainer`: the rollout machinery every online method (GRPO, RLOO, …) shares.

Each dataloader item is a *generation batch* of prompt rows (each prompt repeated num_generations times,
consecutively). On the first micro-step of a cycle the trainer generates, scores and computes advantages once
(named, timed phases: generate, score, advantages, old_logps, reference), shuffles the completions and splits them
into `steps_per_generation` micro-batches; the next micro-steps train on those (for `num_iterations` passes).

Not here: generation (`rollout/hf.py`; vLLM colocated or behind `posttrain vllm-serve`: `rollout/vllm.py`,
`rollout/client.py`), rewards (`rewards/`), advantage and loss maths (`algorithms/`, `losses/`).
Subclasses implement `compute_loss`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from posttrain.data import formats
from posttrain.data.prepare import check_prompts
from posttrain.data.tokenize import tokenize_prompt
from posttrain.models import reference, sharding
from posttrain.models.logprobs import completion_logps, positions_from_mask
from posttrain.rewards.runner import RewardRunner
from posttrain.rollout.hf import generate
from posttrain.trainers import distributed
from posttrain.trainers.base import PostTrainer


class RepeatSampler(Sampler):
    """Indices for generation batches: `unique` prompts per batch, each repeated `mini_repeat` (= G) times in a
    row; every batch is yielded `repeat` times (num_iterations × steps_per_generation micro-steps use it)."""

    def __init__(self, num_rows: int, mini_repeat: int, unique: int, repeat: int, shuffle: bool, seed: int):
        self.num_rows, self.mini_repeat, self.unique, self.repeat = num_rows, mini_repeat, unique, repeat
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_rows)
        order = order.tolist()
        for start in range(0, self.num_rows - self.unique + 1, self.unique):
            chunk = order[start:start + self.unique]
            for _ in range(self.repeat):
                for index in chunk:
                    yield from [index] * self.mini_repeat

    def __len__(self) -> int:
        return (self.num_rows // self.unique) * self.unique * self.mini_repeat * self.repeat


class OnlineTrainer(PostTrainer):
    summary_metrics = (("reward", "reward"), ("completions/mean_length", "completion length"))
    needs_reward_funcs = True  # False: reward_funcs may be left out at construction (PPO's loop API scores itself)

    def missing_reward_funcs_message(self) -> str:
        return (f"{type(self).__name__} needs reward_funcs: a function, a built-in name such as 'accuracy_reward', "
                "a 'module:function' path, or a reward-model id.")

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, peft_config=None, **kwargs: Any):
        model_id = model if isinstance(model, str) else None
        super().__init__(model=model, args=args, data_collator=_keep_rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        args = self.args
        if reward_funcs is None:
            reward_funcs = args.reward_funcs
        reward_funcs = _with_reward_model(reward_funcs, args.reward_model_name_or_path)
        if not reward_funcs and self.needs_reward_funcs:
            raise ValueError(self.missing_reward_funcs_message())
        self.reward_runner = None
        if reward_funcs:
            self.reward_runner = RewardRunner(reward_funcs, args.reward_weights, reward_processing_classes)
            # reward models sit beside the policy as it is placed: sharded under ZeRO-3/FSDP, else on its device
            self.reward_runner.place(self.prepare_frozen, self.accelerator.device)
        self.ref_model = None
        if self.uses_reference():
            if reference.is_peft_model(self.model):
                self.ref_model = None  # adapters off = reference
            else:
                self.ref_model = self.prepare_frozen(
                    reference.create_reference_model(self.model, model_id, args.model_init_kwargs))
            if args.sync_ref_model and self.ref_model is not None:
                self.add_callback(reference.SyncReferenceCallback(self.ref_model, self.model,
                                                                  args.ref_model_sync_steps,
                                                                  args.ref_model_mixup_alpha))
        self._micro_step = 0
        self.vllm = self._vllm_backend(model_id or self.model.config._name_or_path) if args.use_vllm else None
        self._buffer: list[dict[str, Any]] = []
        self._last_table: list[dict[str, Any]] = []

    def _vllm_backend(self, model_name: str):
        """colocate: a vLLM engine in this process (vllm is imported there and nowhere else); server: a client of
        `posttrain vllm-serve`, whose main process sends the weights (the trainer needs no vllm then)."""
        args = self.args
        if args.vllm_mode == "server":
            from posttrain.rollout.client import VLLMServerClient, server_url

            return VLLMServerClient(server_url(args.vllm_server_base_url, args.vllm_server_host, args.vllm_server_port),
                                    args.vllm_server_timeout, self.accelerator.is_main_process,
                                    self.accelerator.wait_for_everyone, model_name)
        from posttrain.rollout.vllm import VLLMColocate

        return VLLMColocate(model_name, args.vllm_gpu_memory_utilization, args.vllm_max_model_length, args.seed,
                            multi_process=args.world_size > 1)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (reference, reward model) placed the way the policy is (`models/sharding.py`)."""
        return sharding.prepare_frozen(self.accelerator, model, self.args)

    # ---- data ---------------------------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            if dataset is None or isinstance(dataset, dict):
                continue
            columns = list(dataset.column_names or [])
            if "prompt" not in columns:
                formats.require_type(columns, ("prompt_only",), type(self).__name__)
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                raise ValueError(f"The {name} dataset is empty; give at least one prompt.")
        # bad prompts (None, "", ints, messages without a chat template) fail here, not at the first rollout
        return self.map_datasets(train_dataset, eval_dataset,
                                 lambda dataset, name: check_prompts(dataset, tokenizer, name) or dataset)

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        G = args.num_generations
        # The sampler walks *global* generation batches (every process's rows); accelerate deals each process its
        # own consecutive slice of generation_batch_size rows, so a group of G may span processes.
        unique = args.generation_batch_size * self.accelerator.num_processes // G
        if len(self.train_dataset) < unique:
            raise ValueError(f"The train dataset has {len(self.train_dataset)} prompts but one generation batch "
                             f"needs {unique}; add prompts or lower per_device_train_batch_size/steps_per_generation.")
        sampler = RepeatSampler(len(self.train_dataset), G, unique, args.num_iterations * args.steps_per_generation,
                                args.shuffle_dataset, args.seed)
        loader = DataLoader(self.train_dataset, batch_size=args.generation_batch_size, sampler=sampler,
                            collate_fn=_keep_rows, num_workers=0)
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """Eval prompts, each repeated num_generations times, in order; one rollout per eval batch."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        G = self.args.num_generations
        unique = max(self.args.per_device_eval_batch_size // G, 1)
        sampler = RepeatSampler(len(dataset), G, 1, 1, shuffle=False, seed=self.args.seed)
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
        yield
        self.record_metrics({f"timing/{name}": time.perf_counter() - start})

    def _prepare_inputs(self, rows):
        if not isinstance(rows, list):  # already a prepared micro-batch (e.g. called twice)
            return rows
        if not self.model.training:
            return self._micro_batches(rows)[0]
        cycle = self.args.steps_per_generation * self.args.num_iterations
        if self._micro_step % cycle == 0:
            self._buffer = self._micro_batches(rows)
        batch = self._buffer[self._micro_step % self.args.steps_per_generation]
        self._micro_step += 1
        return batch

    def generation_kwargs(self) -> dict[str, Any]:
        args = self.args
        # top_k 0 is passed as such: transformers' `generate` fills an unset top_k with 50
        kwargs = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                      min_p=args.min_p, repetition_penalty=args.repetition_penalty)
        kwargs.update(args.generation_kwargs or {})
        return {k: v for k, v in kwargs.items() if v is not None}

    def _micro_batches(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate, score, compute advantages (and old/ref log-probs when needed); split into micro-batches."""
        args, tok = self.args, self.processing_class
        device = args.device
        if self.reward_runner is None:
            raise ValueError(self.missing_reward_funcs_message())
        with self.phase("generate"):
            rollout = self.sample(rows)
        length = int(rollout.completion_mask.sum(1).max().clamp(min=1))
        rollout.completion_ids = rollout.completion_ids[:, :length]
        rollout.completion_mask = rollout.completion_mask[:, :length]
        rollout.prompts = [r["prompt"] for r in rows]
        texts = tok.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        conversational = isinstance(rows[0]["prompt"], list)
        rollout.completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        ids_lists = [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
        with self.phase("score"):
            columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
            rollout.rewards = self.reward_runner(rollout.prompts, rollout.completions, ids_lists, columns,
                                                 trainer_state=self.state).to(device)
        completion_mask = rollout.completion_mask.clone()
        if args.mask_truncated_completions:
            completion_mask[rollout.is_truncated.to(completion_mask.device)] = 0
        batch = {"input_ids": rollout.input_ids.to(device), "attention_mask": rollout.attention_mask.to(device),
                 "completion_mask": completion_mask.to(device)}
        if self.needs_old_logps():
            with self.phase("old_logps"):
                batch["old_logps"] = self._batched_logps(self.model, batch)
        if self.uses_reference():
            with self.phase("reference"), reference.reference_context(self.model, self.ref_model,
                                                                        self.accelerator.unwrap_model) as ref:
                batch["ref_logps"] = self._batched_logps(ref, batch)
        with self.phase("advantages"):
            # group statistics need every member of a group: gather the whole generation batch, keep our rows
            rollout.all_rewards, context = distributed.gather_rollout(self.accelerator, rollout.rewards, batch,
                                                                      tok.pad_token_id, self.model.training)
            advantages = self.advantages(rollout.all_rewards, context)
            rollout.advantages = distributed.local_rows(self.accelerator, advantages, len(rows), self.model.training)
        batch["advantages"] = rollout.advantages.to(device)
        self._record_rollout(rollout, completion_mask)
        return self._split(batch)

    def sample(self, rows: list[dict[str, Any]]):
        """This process's completions for its rows of the generation batch (a `Rollout`, rows in order).

        A prompt's consecutive rows share one prefill. With several processes each samples its own slice, under a
        seed of its own (else a group split across processes would get the same samples twice)."""
        args = self.args
        offset = self.accelerator.process_index * len(rows) if self.model.training else 0
        counts = distributed.group_runs(offset, len(rows), args.num_generations)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        prompt_ids = [self._prompt_ids(rows[i]["prompt"]) for i in starts]
        per_prompt = counts[0] if len(set(counts)) == 1 else counts
        return self.generate_completions(prompt_ids, per_prompt)

    def generate_completions(self, prompt_ids: list[list[int]], per_prompt: int | list[int],
                             generation_kwargs: dict[str, Any] | None = None, max_new_tokens: int | None = None,
                             seed_step: int | None = None):
        """A `Rollout` of the policy's completions of tokenised prompts (`per_prompt` each, or one count per
        prompt), sampled in eval mode through the vLLM engine (colocated or a server) when configured, else
        `rollout/hf.py`. Defaults: `generation_kwargs()`, max_completion_length, and the micro-step as the step of
        the per-process seed."""
        args = self.args
        kwargs = self.generation_kwargs() if generation_kwargs is None else generation_kwargs
        max_new_tokens = args.max_completion_length if max_new_tokens is None else max_new_tokens
        seed_step = self._micro_step if seed_step is None else seed_step
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()
        language_model = getattr(policy, "policy", policy)  # PPO's PolicyAndValue samples from its policy
        with distributed.process_seed(self.accelerator, args.seed, seed_step):
            if self.vllm is not None:  # the engine gets the policy's weights once per optimizer step
                rollout = self.vllm.generate(language_model, self.processing_class, prompt_ids, per_prompt,
                                             max_new_tokens, kwargs, step=self.state.global_step)
            else:
                rollout = generate(language_model, self.processing_class, prompt_ids, per_prompt, max_new_tokens,
                                   kwargs)
        policy.train(was_training)
        return rollout

    def _prompt_ids(self, prompt) -> list[int]:
        ids = tokenize_prompt(self.processing_class, prompt)
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit else ids

    def advantages(self, rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) advantages from (N, K) rewards; `batch` holds the rollout tensors (old/ref log-probs if computed)."""
        raise NotImplementedError

    def uses_reference(self) -> bool:
        """Whether reference log-probs are needed (and so a reference model is held)."""
        return self.args.beta > 0

    def holds_reference(self) -> bool:
        return self.uses_reference() or getattr(self.args, "kl_coef", 0) > 0  # PPO's KL penalty is kl_coef

    def needs_old_logps(self) -> bool:
        """Sampling-policy log-probs are needed when the policy moves before a rollout is fully used."""
        args = self.args
        return args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps

    def _split(self, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        n = batch["input_ids"].shape[0]
        order = torch.randperm(n, device=batch["input_ids"].device) if self.model.training else torch.arange(n)
        num_items = batch["completion_mask"].sum().float()
        if self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.reshape(1)).sum()
        # One optimizer step sees GA of the steps_per_generation micro-batches: normalise by its share of tokens.
        num_items = num_items * self.args.gradient_accumulation_steps / self.args.steps_per_generation
        size = self.args.per_device_train_batch_size if self.model.training else n
        parts = []
        for start in range(0, n, size):
            idx = order[start:start + size]
            part = {k: v[idx] for k, v in batch.items()}
            part["num_items"] = num_items
            parts.append(part)
        return parts

    # ---- log-probs ------------------------------------------------------------------------------------------
    logps_at_sampling_temperature = True  # False: at temperature 1 (online DPO)

    def completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool = False):
        """(logps (B, C), model output dict) of the completion tokens at the sampling temperature (or at 1 where a
        trainer sets `logps_at_sampling_temperature = False`).

        position_ids follow the attention mask so left-padded prompts see the positions generation gave them."""
        completion_mask = batch["completion_mask"]
        prompt_len = batch["input_ids"].shape[1] - completion_mask.shape[1]
        labels = batch["input_ids"].clone()
        labels[:, :prompt_len] = -100
        labels[:, prompt_len:][completion_mask == 0] = -100
        position_ids = positions_from_mask(batch["attention_mask"])
        out = completion_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                       "position_ids": position_ids, "labels": labels},
                               temperature=self.args.temperature if self.logps_at_sampling_temperature else 1.0,
                               with_entropy=with_entropy, shared_prefix=prompt_len)
        logps = out["logps"]
        if logps.shape[1] < completion_mask.shape[1]:  # masks are prefix-contiguous: only trailing columns lack
            logps = torch.nn.functional.pad(logps, (0, completion_mask.shape[1] - logps.shape[1]))
        return logps, out

    @torch.no_grad()
    def _batched_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.args.per_device_train_batch_size
        chunks = []
        for start in range(0, batch["input_ids"].shape[0], size):
            part = {k: batch[k][start:start + size] for k in ("input_ids", "attention_mask", "completion_mask")}
            chunks.append(self.completion_logps(model, part)[0])
        return torch.cat(chunks)

    # ---- metrics ------------------------------------------------------------------------------------------------
    def _record_rollout(self, rollout, completion_mask: torch.Tensor) -> None:
        lengths = rollout.completion_mask.sum(1).float()
        terminated = lengths[~rollout.is_truncated.to(lengths.device)]
        rewards = rollout.rewards
        total = self.reward_runner.weighted_sum(rewards)
        metrics = {
            "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": rollout.is_truncated.float().mean(),
            "completions/mean_terminated_length": terminated.mean() if len(terminated) else torch.tensor(0.0),
            "reward": total.nanmean(),
        }
        G = self.args.num_generations
        if G > 1:  # group statistics need siblings (PPO samples one completion per prompt); groups may span processes
            group_rewards = rewards if rollout.all_rewards is None else rollout.all_rewards
            stds = _nanstd(self.reward_runner.weighted_sum(group_rewards).view(-1, G))
            metrics["reward_std"] = stds.nanmean()
            metrics["frac_reward_zero_std"] = (stds < 1e-6).float().mean()
        for k, name in enumerate(self.reward_runner.names):
            column = rewards[:, k]
            if torch.isnan(column).all():
                continue
            metrics[f"rewards/{name}/mean"] = column.nanmean()
            metrics[f"rewards/{name}/std"] = _nanstd(column.view(1, -1))[0]
        runner = self.reward_runner
        for k, name in enumerate(runner.names):  # NaN returned by a function (not None): see rewards/runner.py
            if runner.nan_totals[k]:
                metrics[f"rewards/{name}/nan_frac"] = runner.last_nan_counts[k] / max(len(rewards), 1)
        self.record_metrics(metrics)
        self.add_tokens_seen(rollout.attention_mask.sum())
        if self.args.log_completions:
            self._last_table = [{"step": self.state.global_step, "prompt": p, "completion": c,
                                 **{name: float(rewards[i, k]) for k, name in enumerate(self.reward_runner.names)},
                                 "advantage": float(rollout.advantages[i])}
                                for i, (p, c) in enumerate(zip(rollout.prompts, rollout.completions))]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._last_table and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "completions.jsonl"), "a") as f:
                for row in self._last_table:
                    f.write(json.dumps(row, default=str) + "\n")
            self._last_table = []


def _keep_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


def reward_list(reward_funcs) -> list:
    """reward_funcs (None, one entry, or a list/tuple of them) as a new list."""
    if reward_funcs is None:
        return []
    return list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]


def _with_reward_model(reward_funcs, reward_model: str | None) -> list:
    """reward_funcs as a list, with the config's reward model (the CLI's --reward_model_name_or_path) appended."""
    funcs = reward_list(reward_funcs)
    if reward_model and reward_model not in funcs:
        funcs.append(reward_model)
    return funcs


def _nanstd(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the last dim, ignoring NaN; NaN where fewer than 2 values."""
    valid = ~torch.isnan(values)
    count = valid.sum(-1).float()
    mean = torch.where(valid, values, 0.0).sum(-1) / count.clamp(min=1)
    sq = torch.where(valid, (values - mean.unsqueeze(-1)) ** 2, 0.0).sum(-1)
    return torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.full_like(count, math.nan))
