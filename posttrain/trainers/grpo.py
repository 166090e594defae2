"""`GRPOTrainer`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4) and its variants —
loss types grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo, vespo; sequence-level importance sampling (GSPO);
the k3 KL to a reference when beta > 0 (times the importance ratio under `use_bias_correction_kl`, the default, as
TRL); entropy-based token selection; an entropy bonus (fixed or Skywork-OR1's adaptive coefficient); DeepSeek-V3.2
off-policy sequence masking; and, for vLLM rollouts, the importance-sampling correction of the sampler/trainer
mismatch (`vllm_importance_sampling_*`: the weight π_old/π_vLLM per token or sequence, truncated or masked).

Advantages are group-relative: each completion's reward minus its group's mean (optionally ÷ group/batch std).
The per-token objective, its aggregation and the corrections are pure functions (`losses/policy.py`); this module
wires them.

Not here: rollouts and the generation-batch cycle (`trainers/online.py`).
"""

from __future__ import annotations

import logging
import math

import torch

from posttrain.algorithms.advantages import group_advantages, normalize_then_sum
from posttrain.configs.grpo import GRPOConfig
from posttrain.errors import UserError
from posttrain.losses.policy import (
    POLICY_LOSSES,
    TRL_LOCAL_NORMALIZATION,
    entropy_mask,
    kl_penalty,
    loss_terms,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from posttrain.losses.reduce import local_reduce
from posttrain.rollout.types import Rollout
from posttrain.trainers.online import OnlineTrainer

logger = logging.getLogger(__name__)


class GRPOTrainer(OnlineTrainer):
    """Same call form as TRL's: `GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...)`;
    `model` may be a name, training arguments may be passed straight to the trainer (guides do)."""

    config_class = GRPOConfig
    method_name = "GRPO"
    vision_data = "prompt"  # image prompts (trainers/vision.py)
    supports_tools = True

    def __init__(self, *args, tools=None, rollout_func=None, environment_factory=None, **kwargs):
        # TRL's tool-calling arguments, spelled out as in its signature (`rollout/agentic.py` runs them)
        super().__init__(*args, tools=tools, rollout_func=rollout_func, environment_factory=environment_factory,
                         **kwargs)
        config = self.args
        _warn_unusual_combinations(config)
        self.entropy_coef = config.entropy_coef  # moves under use_adaptive_entropy (one value per optimizer step)
        self._entropy_bonus_enabled = config.entropy_coef != 0.0 or config.use_adaptive_entropy  # TRL's name
        self._last_step_entropy = math.inf  # no bonus before the first measured step (adaptive)
        self._entropy_window = None  # Σ entropy and token count of the current step's micro-batches
        if config.cast_lm_head_to_fp32:
            models = [self.accelerator.unwrap_model(self.model)]
            if self.reference is not None and self.reference.model is not None:
                models.append(self.reference.model)
            for model in models:
                cast_lm_head_to_fp32(model)

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        """TRL's name for `losses.policy.off_policy_sequence_mask` ((B, 1) float, 1 = keep)."""
        return off_policy_sequence_mask(logps=per_token_logps, sampler_logps=sampling_per_token_logps,
                                        advantages=advantages.squeeze(-1) if advantages.dim() == 2
                                        and advantages.shape[1] == 1 else advantages, mask=mask,
                                        threshold=off_policy_threshold)

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's method, for code that calls it: True on the masked tokens whose entropy is at least the
        `threshold`-quantile of the masked entropies of every process (threshold = 1 - top_entropy_quantile); bool
        (B, T), all False when nothing is masked. compute_loss selects with it, so on several processes the threshold
        is the global one, as in TRL; `losses.policy.entropy_mask` does the selection."""
        pool = entropies.detach()[mask.bool()].float()
        if self.accelerator.num_processes > 1:  # processes hold different token counts: pad with a sentinel < 0
            pool = self.accelerator.gather(self.accelerator.pad_across_processes(pool, dim=0, pad_index=-1.0))
            pool = pool[pool >= 0]
        return entropy_mask(entropies, mask, 1.0 - threshold, pool=pool)

    def needs_old_logps(self) -> bool:
        # vLLM rollouts: the trainer's own log-probs of the sampled tokens are what the sampler's are compared with
        return super().needs_old_logps() or self._sampler_correction()

    def _sampler_correction(self) -> bool:
        return self.args.use_vllm and self.args.vllm_importance_sampling_correction

    def training_batches(self, rollout: Rollout) -> list[list[dict[str, torch.Tensor]]]:
        """Group-relative advantages over the whole generation batch (every process's rows); for vLLM rollouts the
        sampler correction weight of every row (from the old log-probs, once per rollout)."""
        args = self.args
        if args.multi_objective_aggregation == "normalize_then_sum":
            advantages = normalize_then_sum(rollout.group_rewards, self.reward_runner.weights, self.num_generations)
        else:
            advantages, _ = group_advantages(self.reward_runner.weighted_sum(rollout.group_rewards),
                                             self.num_generations, args.scale_rewards)
        extra = {}
        if self._sampler_correction() and rollout.sampler_logps is not None:
            ratio = sampler_importance_weights(old_logps=rollout.old_logps, sampler_logps=rollout.sampler_logps,
                                               mask=rollout.loss_mask, mode=args.vllm_importance_sampling_mode,
                                               clip_min=args.vllm_importance_sampling_clip_min,
                                               clip_max=args.vllm_importance_sampling_clip_max)
            extra["sampler_ratio"] = ratio.expand_as(rollout.loss_mask).contiguous() if ratio.shape[1] > 1 else ratio
            self._record_sampler_metrics(ratio, rollout)
        return self.advantage_batches(rollout, advantages, **extra)

    def _record_sampler_metrics(self, ratio: torch.Tensor, rollout: Rollout) -> None:
        mask = rollout.loss_mask.bool()
        values = ratio[mask] if ratio.shape[1] > 1 else ratio.reshape(-1)
        diff = (rollout.old_logps - rollout.sampler_logps).abs()[mask]
        diff = diff[~diff.isnan()]
        if values.numel():
            self.record_metrics({"sampling/importance_sampling_ratio/min": values.min(),
                                 "sampling/importance_sampling_ratio/mean": values.mean(),
                                 "sampling/importance_sampling_ratio/max": values.max()})
        if diff.numel():
            self.record_metrics({"sampling/sampling_logp_difference/mean": diff.mean(),
                                 "sampling/sampling_logp_difference/max": diff.max()})

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        need_entropy = args.top_entropy_quantile < 1.0
        logps, out = self.completion_logps(model, inputs, with_entropy=True)
        mask = inputs["completion_mask"].bool()
        old_logps = inputs.get("old_logps", logps.detach())
        sampler_ratio = inputs.get("sampler_ratio")
        per_token, metrics = POLICY_LOSSES[args.loss_type](
            logps=logps, old_logps=old_logps, advantages=inputs["advantages"], mask=mask,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            importance_sampling_level=args.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, sampler_ratio=sampler_ratio)
        if args.off_policy_mask_threshold is not None:
            keep = off_policy_sequence_mask(logps=logps, sampler_logps=inputs.get("sampler_logps", old_logps),
                                            advantages=inputs["advantages"], mask=mask,
                                            threshold=args.off_policy_mask_threshold)
            per_token = per_token * keep
            metrics["off_policy_masked_frac"] = 1.0 - keep.mean().detach()
        with torch.no_grad():
            entropies = out["entropy_columns"]
            metrics["entropy"] = (entropies * mask).sum() / mask.sum().clamp(min=1)
        trained = mask  # the tokens the policy term (and the entropy bonus) act on
        if need_entropy:  # as TRL: the selection zeroes the policy term only; the KL and the normalisers keep all
            trained = mask & self.get_high_entropy_mask(entropies, mask, 1.0 - args.top_entropy_quantile)
            per_token = per_token * trained
        if sampler_ratio is not None and args.loss_type != "vespo":  # vespo folds it into its weight
            per_token = per_token * sampler_ratio
        if args.beta > 0:
            kl = kl_penalty(logps=logps, ref_logps=inputs["ref_logps"], old_logps=old_logps, mask=mask,
                            importance_sampling_level=args.importance_sampling_level,
                            bias_correction=args.use_bias_correction_kl)
            per_token = per_token + args.beta * kl
            metrics["kl"] = kl.sum().detach() / mask.sum().clamp(min=1)  # kl_penalty is 0 off the mask
        terms, unit = loss_terms(per_token, mask, args.loss_type, max_completion_length=args.max_completion_length)
        local = args.loss_normalization == "trl" and args.loss_type in TRL_LOCAL_NORMALIZATION
        loss = self.reduce_loss(terms, unit, inputs, local=local)
        if self._entropy_bonus_enabled:
            metrics["policy_loss"] = loss.detach()
            loss = loss - self._entropy_term(entropies, trained, metrics)
        self.record_metrics(metrics)
        return (loss, {}) if return_outputs else loss

    def _entropy_term(self, entropies: torch.Tensor, mask: torch.Tensor, metrics) -> torch.Tensor:
        """coef × mean entropy of the trained tokens (the bonus subtracted from the loss): this micro-batch's mean
        ÷ GA, as TRL, whatever loss_normalization (which tokens are trained — top_entropy_quantile — is known only
        after the forward, so no step-wide count exists beforehand). Adaptive (Skywork-OR1): the coefficient of the
        last step applies while that step's entropy ≤ entropy_target; at each optimizer step's end it moves by
        ±entropy_coef_delta within [entropy_coef_min, entropy_coef_max]."""
        args = self.args
        m = mask.to(entropies.dtype)
        mean_entropy = local_reduce(entropies * m, m.sum(), args.gradient_accumulation_steps
                                    if self.model.training else 1)
        coef = self.entropy_coef
        if args.use_adaptive_entropy:
            coef = coef if self._last_step_entropy <= args.entropy_target else 0.0
            if self.model.training:
                self._update_adaptive_entropy(entropies, m)
        if self.model.training and self.accelerator.sync_gradients:
            metrics["entropy_coef"] = self.entropy_coef
        return coef * mean_entropy

    def _update_adaptive_entropy(self, entropies: torch.Tensor, m: torch.Tensor) -> None:
        stats = torch.stack([(entropies.detach() * m).sum(), m.sum()]).float()
        self._entropy_window = stats if self._entropy_window is None else self._entropy_window + stats
        if not self.accelerator.sync_gradients:
            return
        total = self._entropy_window
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        self._entropy_window = None
        args = self.args
        self._last_step_entropy = float(total[0] / total[1].clamp(min=1))
        if self._last_step_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)


def _warn_unusual_combinations(config: GRPOConfig) -> None:
    """TRL's warnings for loss types used outside the setup of their paper."""
    level, loss_type = config.importance_sampling_level, config.loss_type
    if loss_type == "luspo" and level != "sequence":
        logger.warning("loss_type='luspo' is defined with importance_sampling_level='sequence' (LUSPO = GSPO with "
                       "length-weighted sequences); set it to mirror the paper's setup.")
    if loss_type == "vespo" and level != "token":
        logger.warning("loss_type='vespo' computes its sequence weight itself; importance_sampling_level should be "
                       "'token' (the default).")
    if level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        logger.warning(f"importance_sampling_level='sequence' with loss_type={loss_type!r}: the loss sums per-token "
                       "terms, which weights each sequence by its completion length instead of optimizing the "
                       "per-sequence objective; loss_type='grpo' reproduces the GSPO paper's setup.")


def cast_lm_head_to_fp32(model: torch.nn.Module) -> None:
    """ScaleRL's float32 LM head: the head's weights in float32 and its input cast up by a pre-hook (so a bf16 decoder
    feeds it). A head tied to the input embeddings shares that float32 weight: the embeddings' output is then cast
    back to the model's dtype (a hook), so only the logits are computed in float32, as TRL."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"cast_lm_head_to_fp32=True: {type(model).__name__} has no LM head to cast.")
    if hasattr(head, "base_layer"):  # a PEFT adapter on the head
        raise UserError("cast_lm_head_to_fp32=True does not work with a PEFT adapter on lm_head: remove 'lm_head' "
                        "from the adapter's target_modules, or remove cast_lm_head_to_fp32.")
    dtype = head.weight.dtype
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head.float()
    head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    embeddings = model.get_input_embeddings()
    if getattr(text, "tie_word_embeddings", False) and embeddings is not None and dtype != torch.float32:
        embeddings.register_forward_hook(lambda module, args, output: output.to(dtype))
