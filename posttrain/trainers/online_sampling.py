"""`RolloutSampling`, a mixin of `OnlineTrainer`: a generation batch's rows → this process's completions (`sample`:
plain, image, tool or user rollouts; `generate_completions`: vLLM or transformers, seeded per process), and the
log-prob passes over the trained completion tokens (`completion_logps`) that the losses and the old/reference phases
read.

Not here: generation itself (`rollout/`), logits → log-probs (`models/logprobs.py`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from posttrain.data.tokenize import tokenize_prompt
from posttrain.models.logprobs import completion_labels, completion_logps, positions_from_mask, target_positions
from posttrain.rollout.agentic import custom_rollout
from posttrain.rollout.hf import _eos_ids, generate
from posttrain.trainers import distributed
from posttrain.trainers import vision as trainer_vision


class RolloutSampling:
    """Sampling and log-prob passes of an `OnlineTrainer` (its `args`, `model`, `accelerator`, `vllm`, ...)."""

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

    @contextlib.contextmanager
    def sampling_mode(self):
        """The policy in eval mode while it samples (dropout off), its training mode restored after."""
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()
        try:
            yield policy
        finally:
            policy.train(was_training)

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
        language_model = self.accelerator.unwrap_model(self.language_model())
        # seeded=False: the caller holds the seed (a multi-turn rollout: one random stream for all its turns)
        seeding = distributed.process_seed(self.accelerator, args.seed, seed_step) if seeded else None
        with self.sampling_mode(), seeding or contextlib.nullcontext(), \
                self._gathered_for_generation(language_model):
            if model is not None:
                return generate(self.accelerator.unwrap_model(model), self.processing_class, prompt_ids, per_prompt,
                                max_new_tokens, kwargs)
            if self.vllm is not None:  # the engine gets the policy's weights once per optimizer step
                return self.vllm.generate(language_model, self.processing_class, prompt_ids, per_prompt,
                                          max_new_tokens, kwargs, step=self.state.global_step)
            # With mixed precision the policy's forward autocasts every call; one autocast around the whole rollout
            # keeps each weight's bf16/fp16 cast for all decode steps instead of casting every weight once per token
            # (the same numbers: a SmolLM2-135M rollout of 8 x 64 tokens in bf16 on one CPU core 6.6 -> 3.7 s).
            with self.accelerator.autocast():
                return generate(language_model, self.processing_class, prompt_ids, per_prompt, max_new_tokens,
                                kwargs)

    def _gathered_for_generation(self, model: torch.nn.Module):
        """ds3_gather_for_generation (DeepSpeed ZeRO-3, transformers generation): the whole weights gathered on
        every process for the rollout (fast decoding); False, or any other setup: generate as placed (ZeRO-3 then
        gathers layer by layer in every forward: slower, less memory)."""
        if (not self.args.ds3_gather_for_generation or self.vllm is not None
                or not any(hasattr(p, "ds_id") for p in model.parameters())):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))

    def last_prompt_tokens(self, ids: list[int]) -> list[int]:
        """A prompt's ids kept to their last max_prompt_length tokens (all of them when None)."""
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit else ids

    def _prompt_ids(self, prompt, row_template_kwargs: dict | None = None) -> list[int]:
        """A prompt's ids: conversational prompts rendered with chat_template_kwargs (the config's, updated by the
        row's own `chat_template_kwargs` column, as TRL), then kept to their last max_prompt_length tokens."""
        template_kwargs = {**(getattr(self.args, "chat_template_kwargs", None) or {}), **(row_template_kwargs or {})}
        return self.last_prompt_tokens(tokenize_prompt(self.processing_class, prompt,
                                                       chat_template_kwargs=template_kwargs))

    # ---- log-probs ------------------------------------------------------------------------------------------
    logps_at_sampling_temperature = True  # False: at temperature 1 (online DPO)
    pack_log_prob_rows = True  # False where the policy's own pass runs padded (PPO): both sides the same arithmetic

    def completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool = False,
                         with_values: bool = False):
        """(logps (B, C), model output dict) of the trained completion tokens (`completion_mask` of the batch: the
        rollout's loss mask) at the sampling temperature (or at 1 where a trainer sets
        `logps_at_sampling_temperature = False`); 0 on every other column. With `with_entropy`, out["entropy_columns"]
        (B, C) holds the entropy at the same columns (0 elsewhere). With `with_values` (PPO's policy-and-critic
        container), out["output"]["state_values"] (B, P + C) holds the critic's values from the same forward.

        Columns that carry no target (tool results of a multi-turn rollout, padding) may sit anywhere in the
        completion: the log-prob pass returns the kept positions only, and they are put back at their columns.
        position_ids follow the attention mask so left-padded prompts see the positions generation gave them."""
        B, C = batch["completion_mask"].shape
        labels, prompt_len = completion_labels(batch["input_ids"], batch["completion_mask"])
        position_ids = positions_from_mask(batch["attention_mask"])
        out = completion_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                       "position_ids": position_ids, "labels": labels,
                                       **trainer_vision.rollout_image_inputs(self, batch, model)},
                               temperature=self.args.temperature if self.logps_at_sampling_temperature else 1.0,
                               with_entropy=with_entropy, shared_prefix=0 if with_values else prompt_len,
                               pack_rows=self.pack_log_prob_rows, **({"with_values": True} if with_values else {}))
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
    def in_micro_batches(self, batch: dict[str, torch.Tensor], fn) -> torch.Tensor:
        """fn over the batch's rows in slices of per_device_train_batch_size (no gradients), concatenated."""
        size = self.args.per_device_train_batch_size
        return torch.cat([fn({k: v[start:start + size] for k, v in batch.items()})
                          for start in range(0, batch["input_ids"].shape[0], size)])

    def _batched_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) log-probs of the trained completion tokens of every row, a micro-batch at a time."""
        return self.in_micro_batches(batch, lambda part: self.completion_logps(model, part)[0])
