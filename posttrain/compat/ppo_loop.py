"""TRL's older PPO loop API, an adapter over `PPOTrainer`: `dataloader`, `generate`, `step` and `log_stats`.

Guides written for older TRL releases drive PPO from a loop of their own:

    for batch in ppo_trainer.dataloader:
        query_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(query_tensors, return_prompt=False, **generation_kwargs)
        rewards = [torch.tensor(score) for score in scores]
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)

Each piece is a thin adapter over what `trainer.train()` runs, so the two cannot drift apart: sampling is
`OnlineTrainer.generate_completions`; a step's rollout gets its log-probs from `OnlineTrainer.add_logps` and its
training batches (values, KL-penalised rewards, GAE, whitening, the mini-batches of every PPO epoch) from the
trainer's one hook, `PPOTrainer.training_batches`; every micro-batch's loss and backward is the Trainer's
`training_step` (→ `PPOTrainer.compute_loss`: clipped policy and value losses); logging is the trainer's `log`.
The first use prints one FutureWarning that names the modern form.

The trainer may be built without reward functions, as the guides build it (`PPOTrainer(config=..., model=...,
ref_model=..., tokenizer=..., dataset=..., data_collator=...)`): the loop brings its own scores, and `train()`
asks for reward_funcs.

Where it differs from TRL's loop: queries and responses are lists of unpadded 1-D token-id tensors; a response's
tokens after its first EOS are not trained on (as in every posttrain rollout); `step` takes any number of queries
≥ num_mini_batches (TRL: exactly batch_size); the learning rate stays constant unless max_steps is set (then the
configured schedule runs over max_steps optimizer steps); `step`'s stats are this process's values (`log_stats`
reduces across processes as every log does). `step` runs in one process or under DDP, not under DeepSpeed or FSDP
(use `train()`); only the one-process path is tested.

Not here: the PPO maths (`trainers/ppo.py`, `algorithms/advantages.py`, `losses/value.py`), generation
(`rollout/`), the older constructor arguments (`compat/ppo.py`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from posttrain.compat import deprecated
from posttrain.errors import UserError
from posttrain.rollout.hf import _eos_ids, left_pad, rollout_after_eos

LOOP_API = ("dataloader", "generate", "step", "log_stats")


class PPOLoopAdapter:
    """The loop API over one `PPOTrainer` (which provides the rollout, target, mini-batch and loss code it calls);
    `PPOTrainer.__getattr__` creates it on first use of a LOOP_API name."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._loop_generations = 0  # generate() calls: the step of the per-process sampling seed
        name = type(trainer).__name__  # one warning per trainer, at the first use (the stack level: the user's line)
        deprecated(f"{name}'s loop API (dataloader, generate, step, log_stats) is deprecated; use "
                   f"{name}(model, reward_funcs=..., args=PPOConfig(...), train_dataset=...).train(), which "
                   "generates, scores and updates by itself (reward_funcs: reward functions or reward models).",
                   stacklevel=4)

    # ---- data ---------------------------------------------------------------------------------------------------
    @functools.cached_property
    def dataloader(self) -> DataLoader:
        """Batches of generation_batch_size (TRL's batch_size) prompts, shuffled, the last incomplete one dropped:
        dicts of lists with `input_ids` (1-D LongTensors: the dataset's own ids, else the tokenised prompt),
        `query` (the prompt) and every dataset column. Built on first use."""
        dataset, size = self.trainer.train_dataset, self.trainer.args.generation_batch_size
        if dataset is None or len(dataset) < size:
            have = "no train dataset" if dataset is None else f"{len(dataset)} prompts"
            raise UserError(f"{type(self.trainer).__name__}.dataloader yields batches of {size} prompts "
                            f"(batch_size) but there are {have}; pass dataset=... with at least {size} prompts.")
        loader = DataLoader(dataset, batch_size=size, shuffle=True, drop_last=True, collate_fn=self._queries,
                            generator=torch.Generator().manual_seed(self.trainer.args.seed))
        return self.trainer.accelerator.prepare(loader)

    def _queries(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        batch = {key: [row[key] for row in rows] for key in rows[0]}
        batch["input_ids"] = [torch.as_tensor(row["input_ids"], dtype=torch.long) if "input_ids" in row
                              else torch.tensor(self.trainer._prompt_ids(row["prompt"]), dtype=torch.long)
                              for row in rows]
        batch.setdefault("query", batch["prompt"])
        return batch

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, query_tensor, return_prompt: bool = True, length_sampler=None, batch_size: int | None = None,
                 **generation_kwargs: Any):
        """Sample one response per query with the policy (the trainer's own rollout code).

        query_tensor: a list of 1-D token-id tensors → a list of 1-D tensors, each query + response (or the response
        alone with return_prompt=False), unpadded, ending at the first EOS; or one 1-D tensor → a (1, L) tensor.
        generation_kwargs override the config's sampling options (max_new_tokens, or length_sampler(), defaults to
        max_completion_length; pad_token_id and a non-positive min_length are ignored); batch_size: queries per
        generation call (default: all at once)."""
        single = isinstance(query_tensor, torch.Tensor)
        if single and query_tensor.dim() != 1:
            raise UserError(f"generate() takes a 1-D tensor of token ids or a list of them, got a tensor of shape "
                            f"{tuple(query_tensor.shape)}; pass list(query_tensor) for a padded batch.")
        queries = [query_tensor] if single else list(query_tensor)
        _check_token_tensors("generate", "query_tensor", queries)
        kwargs = {**self.trainer.generation_kwargs(), **generation_kwargs}
        max_new_tokens = kwargs.pop("max_new_tokens", None) or self.trainer.args.max_completion_length
        if length_sampler is not None:
            max_new_tokens = int(length_sampler())
        kwargs.pop("pad_token_id", None)  # completions are padded with the tokenizer's pad token, masked after EOS
        if kwargs.get("min_length") is not None and kwargs["min_length"] <= 0:
            kwargs.pop("min_length")  # TRL's guides pass -1 for "no minimum"
        if isinstance(kwargs.get("top_k"), float):
            kwargs["top_k"] = int(kwargs["top_k"])  # the guides write top_k=0.0 (0 = off)
        size = batch_size or len(queries)
        outputs = []
        for start in range(0, len(queries), size):
            chunk = queries[start:start + size]
            self._loop_generations += 1
            rollout = self.trainer.generate_completions([q.tolist() for q in chunk], 1, kwargs, max_new_tokens,
                                                seed_step=self._loop_generations)
            for query, ids, mask in zip(chunk, rollout.completion_ids, rollout.completion_mask):
                response = ids[mask.bool()].to(query.device)
                outputs.append(torch.cat([query, response]) if return_prompt else response)
        return outputs[0].unsqueeze(0) if single else outputs

    # ---- one PPO update -----------------------------------------------------------------------------------------
    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list) -> dict[str, float]:
        """One PPO update on these completions: reference log-probs, values, KL-penalised rewards, GAE, then
        num_ppo_epochs passes of num_mini_batches optimizer steps on the clipped policy and value losses.

        queries, responses: lists of N 1-D token-id tensors (unpadded); scores: N scalars (0-d tensors or numbers).
        Returns TRL-style statistics (floats) of this update."""
        scores = self._check_step(queries, responses, scores)
        start = time.perf_counter()
        args = self.trainer.args
        model = self._loop_model
        self.trainer.model.train()
        before = {key: list(value) for key, value in self.trainer._metrics["train"].items()}
        # the rollout laid out as generation lays it out: prompts left-padded, completions cut after their first EOS
        tok, policy = self.trainer.processing_class, self.trainer.accelerator.unwrap_model(self.trainer.model)
        prompt_ids, prompt_mask = left_pad([q.tolist() for q in queries], tok.pad_token_id)
        rollout = rollout_after_eos(prompt_ids.to(args.device), prompt_mask.to(args.device),
                                    [r.detach().cpu() for r in responses], _eos_ids(policy, tok), tok.pad_token_id)
        rollout.prompts, rollout.scores = [None] * len(responses), scores.to(args.device)
        self.trainer.add_logps(rollout)
        steps = self.trainer.with_item_counts(self.trainer.training_batches(rollout))
        self.trainer.add_tokens_seen(rollout.attention_mask.sum())
        learning_rate = self.trainer._get_learning_rate()
        for step in steps:
            for part in step:
                self.trainer.training_step(model, part)
            self._loop_optimizer_step(model)
        first_pass = [part for step in steps[:len(steps) // args.num_ppo_epochs] for part in step]  # every row once
        targets = {k: torch.cat([part[k] for part in first_pass]) for k in ("completion_mask", "old_values", "returns")}
        return self._step_stats(before, targets, scores, queries, responses, learning_rate,
                                time.perf_counter() - start)

    def _check_step(self, queries, responses, scores) -> torch.Tensor:
        """Validate step()'s inputs (one line each); the scores as an (N,) float32 tensor."""
        for name, value in (("queries", queries), ("responses", responses), ("scores", scores)):
            if not isinstance(value, (list, tuple)):
                raise UserError(f"step() takes {name} as a list (one entry per completion), got "
                                f"{type(value).__name__}.")
        if not (len(queries) == len(responses) == len(scores)):
            raise UserError(f"step() got {len(queries)} queries, {len(responses)} responses and {len(scores)} "
                            "scores; give one response and one score per query.")
        if len(queries) < self.trainer.args.num_mini_batches:
            raise UserError(f"step() got {len(queries)} queries but num_mini_batches is "
                            f"{self.trainer.args.num_mini_batches}; give at least one query per mini-batch.")
        _check_token_tensors("step", "queries", queries)
        _check_token_tensors("step", "responses", responses)
        values = []
        for i, score in enumerate(scores):
            score = torch.as_tensor(score, dtype=torch.float32).detach().cpu()
            if score.numel() != 1:
                raise UserError(f"step(): scores[{i}] must be a scalar (a 0-d tensor or a number), got shape "
                                f"{tuple(score.shape)}.")
            if not torch.isfinite(score).all():
                raise UserError(f"step(): scores[{i}] is {score.item()}; scores must be finite.")
            values.append(score.reshape(()))
        return torch.stack(values)

    @functools.cached_property
    def _loop_model(self) -> torch.nn.Module:
        """The model to train on; the optimizer (and, with several processes, DDP) on first use."""
        trainer = self.trainer
        kind = trainer.accelerator.distributed_type.value
        if kind in ("DEEPSPEED", "FSDP"):
            raise NotImplementedError(f"{type(trainer).__name__}.step() does not run under {kind}; use "
                                      "trainer.train() with reward_funcs=..., which does.")
        if trainer.optimizer is None:
            trainer.create_optimizer()
        if trainer.accelerator.num_processes > 1:
            trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        if trainer.lr_scheduler is None:
            if trainer.args.max_steps > 0:
                trainer.create_scheduler(num_training_steps=trainer.args.max_steps, optimizer=trainer.optimizer)
            else:  # TRL's loop keeps the learning rate constant
                trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
        return trainer.model_wrapped

    def _loop_optimizer_step(self, model: torch.nn.Module) -> None:
        """What the Trainer's loop does at the end of an accumulated step (clip, guard, step, schedule)."""
        trainer = self.trainer
        args = trainer.args
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            trainer._clip_grad_norm(model)
        trainer.control = trainer.callback_handler.on_pre_optimizer_step(args, trainer.state, trainer.control)
        trainer.optimizer.step()
        trainer.control = trainer.callback_handler.on_optimizer_step(args, trainer.state, trainer.control)
        if not trainer.accelerator.optimizer_step_was_skipped:
            trainer.lr_scheduler.step()
        model.zero_grad()
        trainer.state.global_step += 1

    def _step_stats(self, before, rollout, scores, queries, responses, learning_rate, seconds) -> dict[str, float]:
        """TRL's names for what this update computed: the metrics `ppo_targets` and `compute_loss` recorded during
        it (means over its micro-batches), and statistics of the rollout and of the inputs."""
        recorded = {}
        for key, (total, weight) in self.trainer._metrics["train"].items():
            old_total, old_weight = before.get(key, (0.0, 0.0))
            if weight > old_weight:
                recorded[key] = (total - old_total) / (weight - old_weight)
        mask = rollout["completion_mask"].bool()
        values, returns = rollout["old_values"][mask], rollout["returns"][mask]
        query_lengths = torch.tensor([len(q) for q in queries], dtype=torch.float32)
        response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        stats = {key: recorded[key] for key in ("objective/kl", "objective/kl_coef", "objective/entropy")}
        # TRL's ppo/loss/policy, ppo/policy/clipfrac, ... are the trainer's loss/policy_avg, policy/clipfrac_avg, ...
        stats.update({f"ppo/{key}": recorded[f"{key}_avg"] for key in (
            "loss/policy", "loss/value", "policy/entropy", "policy/approxkl", "policy/clipfrac", "val/clipfrac")})
        stats.update({
            "ppo/mean_non_score_reward": recorded["objective/non_score_reward"],
            "ppo/mean_scores": scores.mean(), "ppo/std_scores": scores.std() if len(scores) > 1 else 0.0,
            "ppo/loss/total": recorded["loss/policy_avg"] + self.trainer.args.vf_coef * recorded["loss/value_avg"],
            "ppo/val/mean": values.mean(), "ppo/val/var": values.var() if values.numel() > 1 else 0.0,
            "ppo/returns/mean": returns.mean(), "ppo/returns/var": returns.var() if returns.numel() > 1 else 0.0,
            "ppo/learning_rate": learning_rate,
            "tokens/queries_len_mean": query_lengths.mean(), "tokens/responses_len_mean": response_lengths.mean(),
            "time/ppo/total": seconds,
        })
        return {key: float(value) for key, value in stats.items()}

    # ---- logging ------------------------------------------------------------------------------------------------
    def log_stats(self, stats: dict[str, Any], batch: dict[str, Any], rewards: list,
                  columns_to_log: tuple[str, ...] = ("query", "response")) -> None:
        """Log `step`'s stats, the rewards' mean and std (env/reward_mean, env/reward_std) and what the trainer
        recorded since its last log, through the trainer's `log` (log history, report_to, metrics.jsonl). With
        log_completions, the batch's query/response texts (when it carries them) go to completions.jsonl."""
        rewards = torch.stack([torch.as_tensor(r, dtype=torch.float32).detach().cpu().reshape(()) for r in rewards])
        logs = {key: float(value) for key, value in stats.items()
                if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)}
        logs["env/reward_mean"] = float(rewards.mean())
        logs["env/reward_std"] = float(rewards.std()) if len(rewards) > 1 else 0.0
        query_key, response_key = (tuple(columns_to_log) + ("query", "response"))[:2]
        if self.trainer.args.log_completions and query_key in batch and response_key in batch:
            step = self.trainer.state.global_step
            self.trainer._last_table = [{"step": step, "prompt": q, "completion": c, "reward": float(r)}
                                        for q, c, r in zip(batch[query_key], batch[response_key], rewards.tolist())]
        self.trainer.log(logs)


def _check_token_tensors(method: str, name: str, tensors: list) -> None:
    if not tensors:
        raise UserError(f"{method}() got no {name}; give a list of 1-D token-id tensors.")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            what = f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) \
                else type(t).__name__
            raise UserError(f"{method}(): {name}[{i}] must be a 1-D tensor of token ids, got {what}.")
        if t.numel() == 0:
            raise UserError(f"{method}(): {name}[{i}] is empty; every entry needs at least one token.")
