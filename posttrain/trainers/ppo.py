"""`PPOTrainer`: classic RLHF PPO with a learned critic (Schulman et al. 2017; Ziegler et al. 2019; the "N
implementation details of RLHF with PPO" recipe that TRL's PPOTrainer follows).

One rollout (per_device × GA × num_mini_batches completions) is generated, scored and given its old and reference
log-probs by the shared online machinery (`trainers/online.py`); this module's one hook, `training_batches`, turns
it into per-token targets:
  r_t = −β·kl_t (policy vs reference log-probs, k1 or k3; β = kl_coef, or adapted after every rollout
  towards kl_target when adaptive_kl), plus the score (reward functions / reward model,
  minus missing_eos_penalty without EOS) on the last completion token; optionally whitened (scale only);
  V_t = the critic's value of the state before token t (old values, no grad);
  Â, R = GAE(γ, λ) (R = Â + V); Â whitened over the rollout's completion tokens.
It trains num_ppo_epochs passes over the rollout, each reshuffled into num_mini_batches optimizer steps, on
  pg + vf_coef·vf: the clipped surrogate and the clipped value loss, both means over the mini-batch's tokens.

The policy and the critic are one `PolicyAndValue` module for the Hugging Face Trainer, so its optimizer, gradient
clipping, distributed wrapping and checkpoints cover both; `save_model` writes the policy as an ordinary causal LM
in output_dir and the critic in output_dir/value_model.

Deviations from TRL: the score sits on the last completion token (TRL: one position past it, with the value mask
widened by one); losses are token means over the whole mini-batch, not means of micro-batch means; `global_step`
counts optimizer steps (TRL counts rollouts); `val/ratio_var` is the per-token variance of the ratio.

TRL's older call forms: `config=`/`dataset=` and the `query`/`input_ids` columns (`compat/ppo.py`); the loop API
(`dataloader`, `generate`, `step`, `log_stats`), an adapter reached through `__getattr__` (`compat/ppo_loop.py`).

Not here: generation, reward calls and rollout metrics (`trainers/online.py`), GAE and whitening
(`algorithms/advantages.py`), the per-token losses (`losses/value.py`), the critic (`models/value.py`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from posttrain import compat
from posttrain.algorithms.advantages import AdaptiveKLController, FixedKLController, gae, whiten
from posttrain.compat.ppo import prompts_from_older_columns, translate_ppo_trainer_arguments
from posttrain.configs.ppo import PPOConfig
from posttrain.errors import UserError
from posttrain.losses.kl import KL_ESTIMATORS
from posttrain.losses.value import clipped_value_loss, ppo_policy_loss
from posttrain.models import loading
from posttrain.models.logprobs import positions_from_mask
from posttrain.models.value import PolicyAndValue, load_value_model, token_values, value_model_from_policy
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer, as_list

_TRAINER_ARGUMENTS = ("compute_metrics", "callbacks", "optimizers", "preprocess_logits_for_metrics")


class PPOTrainer(OnlineTrainer):
    """`PPOTrainer(model, reward_funcs=..., args=PPOConfig(...), train_dataset=..., value_model=None,
    ref_model=None, processing_class=None, peft_config=None)`; `reward_model=` (TRL's name) is a reward function
    too. The older forms (module docstring) still work; the loop API needs no reward_funcs."""

    pack_log_prob_rows = False  # its policy-and-critic pass runs padded (completion_logps with values)

    config_class = PPOConfig
    method_name = "PPO"
    summary_metrics = (("objective/scores", "score"), ("objective/kl", "kl"), ("loss/value_avg", "value loss"))
    kl_weight = "kl_coef"
    needs_reward_funcs = False  # the older loop API passes scores to `step`; `train()` asks for them
    requires_train_dataset = False  # the loop API (`compat/ppo_loop.py`) brings its own prompts

    def __init__(self, model=None, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 value_model=None, ref_model=None, processing_class=None, reward_processing_classes=None,
                 peft_config=None, reward_model=None, **kwargs: Any):
        name = type(self).__name__
        args, train_dataset = translate_ppo_trainer_arguments(name, args, train_dataset, kwargs)
        trainer_kwargs = {k: kwargs.pop(k) for k in _TRAINER_ARGUMENTS if k in kwargs}
        args, processing_class = compat.resolve_trainer_arguments(name, PPOConfig, args, processing_class, kwargs)
        model = model if model is not None else args.sft_model_path
        if model is None:
            raise UserError(f"{name} needs a model: PPOTrainer(model='name or path' or a loaded causal LM).")
        reward_funcs = as_list(reward_funcs) + ([reward_model] if reward_model is not None else [])  # TRL's name
        if not reward_funcs and args.reward_model_path:  # else the config's reward_funcs or reward_model_path
            reward_funcs = [args.reward_model_path]
        super().__init__(model, reward_funcs or None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         peft_config=peft_config, ref_model=ref_model, **trainer_kwargs)
        args, policy = self.args, self.model
        # the critic is trained: it joins the policy in the one container the Trainer prepares (DDP/ZeRO/FSDP)
        self.model = self.model_wrapped = PolicyAndValue(policy, self._value_model(value_model)).to(args.device)
        self.callback_handler.model = self.model
        self._episodes, self._start_time = 0, None
        self.kl_controller = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
                              if args.adaptive_kl else FixedKLController(args.kl_coef))

    def language_model(self) -> torch.nn.Module:
        container = self.accelerator.unwrap_model(self.model)  # a plain policy while the base constructor runs
        return container.policy if isinstance(container, PolicyAndValue) else self.model

    def __getattr__(self, name: str):
        """TRL's older loop API (`dataloader`, `generate`, `step`, `log_stats`) through its adapter."""
        from posttrain.compat.ppo_loop import LOOP_API, PPOLoopAdapter

        if name not in LOOP_API:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if "_loop_adapter" not in self.__dict__:
            self.__dict__["_loop_adapter"] = PPOLoopAdapter(self)
        return getattr(self.__dict__["_loop_adapter"], name)

    def missing_reward_funcs_message(self) -> str:
        return ("PPOTrainer.train() needs reward_funcs (functions, built-in names or reward models; reward_model= "
                "works too); without them only the older loop API runs (generate, then step(queries, responses, "
                "scores)).")

    def _value_model(self, value_model) -> torch.nn.Module:
        args = self.args
        if value_model is None and args.value_model_name_or_path:
            value_model = args.value_model_name_or_path
        if isinstance(value_model, str):
            value_model = load_value_model(value_model, **(args.model_init_kwargs or {}))
        elif value_model is None:
            value_model = value_model_from_policy(self.model, args.model_init_kwargs)
        if args.disable_dropout:
            loading.disable_dropout(value_model)
        if getattr(value_model.config, "pad_token_id", None) is None:  # so the saved critic also scores batches
            value_model.config.pad_token_id = getattr(self.processing_class, "tokenizer",
                                                      self.processing_class).pad_token_id
        return value_model.train()

    # ---- data ---------------------------------------------------------------------------------------------------
    def prepare_datasets(self, train_dataset, eval_dataset, tokenizer, args):
        train_dataset, eval_dataset = self.map_datasets(
            train_dataset, eval_dataset, lambda dataset, name: prompts_from_older_columns(dataset, tokenizer))
        return super().prepare_datasets(train_dataset, eval_dataset, tokenizer, args)

    # ---- rollout ------------------------------------------------------------------------------------------------
    uses_old_logps = True  # the KL penalty in the reward and the ratio of the first pass both use them

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """PPO's targets (`ppo_targets`), then num_ppo_epochs passes, each reshuffled into num_mini_batches
        optimizer steps (one step of every row in evaluation)."""
        scores = torch.nan_to_num(rollout.scores, nan=0.0)  # unscorable → 0
        batch = self.ppo_targets(self.rollout_tensors(rollout), scores, rollout.is_truncated)
        m = batch["completion_mask"].float()
        rollout.advantages = (batch["advantages"] * m).sum(1) / m.sum(1).clamp(min=1)  # completions table
        if not self.model.training:
            return [[batch]]
        return [step for _ in range(self.args.num_ppo_epochs) for step in self.mini_batch_groups(batch)]

    @torch.no_grad()
    def ppo_targets(self, batch: dict[str, torch.Tensor], scores: torch.Tensor,
                    truncated: torch.Tensor) -> dict[str, Any]:
        """The rollout batch → PPO's training batch.

        batch: input_ids, attention_mask (N, P + C), completion_mask (N, C), old_logps (N, C), ref_logps (N, C)
        when kl_coef > 0; scores (N,); truncated (N,) bool: no EOS. Adds scores (after missing_eos_penalty),
        old_values, advantages (whitened) and returns (N, C); records the objective/* metrics and, in training,
        adapts the KL coefficient."""
        args = self.args
        container = self.accelerator.unwrap_model(self.model)
        mask = batch["completion_mask"]
        m = mask.float()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * truncated.float()
        logps = batch["old_logps"]
        ref_logps = batch.get("ref_logps", logps)
        with self.phase("values"):  # (N, C): the critic's value of the state before each completion token
            prompt_len = batch["input_ids"].shape[1] - mask.shape[1]
            values = self.in_micro_batches(batch, lambda part: token_values(
                container.value_model, part["input_ids"], part["attention_mask"],
                positions_from_mask(part["attention_mask"]))[:, prompt_len - 1:-1])
        with self.phase("gae"):
            kl = KL_ESTIMATORS[args.kl_estimator](logps, ref_logps) * m
            non_score = -self.kl_controller.value * kl
            rewards = non_score.clone()
            last = (mask.sum(1) - 1).clamp(min=0)
            rows = torch.arange(rewards.shape[0], device=rewards.device)
            rewards[rows, last] += torch.where(mask.any(1), scores, 0.0)
            if args.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
            advantages = whiten(advantages, mask)
        batch.update(scores=scores, old_values=values, advantages=advantages, returns=returns)
        non_score_sum = non_score.sum(1)
        self.record_metrics({
            "objective/kl": kl.sum(1).mean(), "objective/entropy": (-logps * m).sum(1).mean(),
            "objective/non_score_reward": non_score_sum.mean(), "objective/scores": scores.mean(),
            "objective/rlhf_reward": (scores + non_score_sum).mean(), "objective/kl_coef": self.kl_controller.value,
            "val/num_eos_tokens": (~truncated).sum().float()})
        if self.model.training:  # the `episode`/`eps` logs count from the first training rollout
            self._episodes += scores.shape[0] * self.accelerator.num_processes
            if self._start_time is None:
                self._start_time = time.perf_counter()
            # adaptive KL: the coefficient of the next rollout follows this one's KL
            mean_kl = kl.sum(1).mean()
            if args.world_size > 1:
                mean_kl = self.accelerator.reduce(mean_kl, reduction="mean")
            self.kl_controller.update(float(mean_kl), scores.shape[0] * self.accelerator.num_processes)
        return batch

    def checkpoint_state(self) -> dict[str, Any]:
        """Adds the KL coefficient, the episode count and the training time."""
        elapsed = time.perf_counter() - self._start_time if self._start_time is not None else 0.0
        return {**super().checkpoint_state(), "kl_coef": self.kl_controller.value, "episodes": self._episodes,
                "elapsed": elapsed}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self.kl_controller.value = state.get("kl_coef", self.kl_controller.value)
        self._episodes = state.get("episodes", self._episodes)
        if self._episodes:  # `eps` keeps counting training time, not the time the run was down
            self._start_time = time.perf_counter() - float(state.get("elapsed", 0.0))

    def mini_batch_groups(self, rollout: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """One PPO epoch: the rollout reshuffled into num_mini_batches mini-batches (one optimizer step each) of
        micro-batches of per_device_train_batch_size rows. (A rollout from the loop API's `step` may hold a number
        of rows that num_mini_batches does not divide: the mini-batches then differ by one row.)"""
        args = self.args
        n = rollout["input_ids"].shape[0]
        order = torch.randperm(n, device=rollout["input_ids"].device)
        micro = args.per_device_train_batch_size
        return [[{k: v[indices[offset:offset + micro]] for k, v in rollout.items()}
                 for offset in range(0, len(indices), micro)]
                for indices in order.tensor_split(min(args.num_mini_batches, n))]

    # ---- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        mask = inputs["completion_mask"]
        # one forward of policy and critic: logps (B, C) at the sampling temperature, the critic's values (B, C) and
        # the trained tokens' entropies (N,)
        logps, out = self.completion_logps(model, inputs, with_entropy=True, with_values=True)
        prompt_len = inputs["input_ids"].shape[1] - mask.shape[1]
        values, entropies = out["output"]["state_values"][:, prompt_len - 1:-1], out["entropy"]
        pg, pg_metrics = ppo_policy_loss(logps, inputs["old_logps"], inputs["advantages"], mask, args.cliprange)
        vf, vf_metrics = clipped_value_loss(values, inputs["old_values"], inputs["returns"], mask,
                                            args.cliprange_value)
        m = mask.float()
        loss = self.reduce_loss((pg + args.vf_coef * vf) * m, "token", inputs)  # token mean of the mini-batch
        with torch.no_grad():
            count = m.sum().clamp(min=1)
            ratio = torch.exp(logps - inputs["old_logps"])
            ratio_mean = (ratio * m).sum() / count
            self.record_metrics({
                "policy/approxkl_avg": pg_metrics["approxkl"], "policy/clipfrac_avg": pg_metrics["clipfrac"],
                "policy/entropy_avg": entropies.mean() if len(entropies) else 0.0,
                "loss/policy_avg": (pg * m).sum() / count, "loss/value_avg": (vf * m).sum() / count,
                "val/clipfrac_avg": vf_metrics["clipfrac"], "val/ratio": ratio_mean,
                "val/ratio_var": (((ratio - ratio_mean) ** 2) * m).sum() / count})
        return (loss, {}) if return_outputs else loss

    # ---- saving -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _as_model(self, module: torch.nn.Module):
        """Let the Trainer's save/load code see one of the two models as `self.model`."""
        container = self.model
        self.model = module
        try:
            yield
        finally:
            self.model = container

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy as an ordinary checkpoint in output_dir, the critic in output_dir/value_model."""
        container = self.model
        if not isinstance(container, PolicyAndValue):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        for name, directory in (("policy", output_dir), ("value_model", os.path.join(output_dir, "value_model"))):
            # a state dict gathered from a sharded container (DeepSpeed, FSDP) holds both: keep this model's part
            part = None if state_dict is None else {k[len(name) + 1:]: v for k, v in state_dict.items()
                                                    if k.startswith(name + ".")}
            with self._as_model(getattr(container, name)):
                super()._save(directory, part)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        container = model if model is not None else self.model
        if not isinstance(container, PolicyAndValue):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with self._as_model(container.policy):
            super()._load_from_checkpoint(resume_from_checkpoint)
        value_dir = os.path.join(resume_from_checkpoint, "value_model")
        if os.path.isdir(value_dir):
            with self._as_model(container.value_model):
                super()._load_from_checkpoint(value_dir)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._episodes and not any(k.startswith("eval_") for k in logs):
            logs["episode"] = self._episodes
            logs["eps"] = self._episodes / max(time.perf_counter() - self._start_time, 1e-9)
        super().log(logs, start_time)

