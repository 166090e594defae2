"""Callbacks users attach to a trainer, with TRL's names and arguments (`trainer.add_callback(...)` or
`callbacks=[...]`):

    SyncRefModelCallback   TR-DPO: every `args.ref_model_sync_steps` steps, ref ← α·policy + (1−α)·ref
    LogCompletionsCallback generate for the eval prompts every `freq` steps; table kept, written, sent to W&B
    BEMACallback           bias-corrected EMA of the weights (Block et al., 2025), saved to output_dir/bema
    MergeModelCallback     merge the trained policy with a reference model (linear or slerp; `MergeConfig`)

Posttrain's trainers already do TR-DPO themselves with `sync_ref_model=True`; `SyncRefModelCallback` is for a
reference held elsewhere (it uses the same update, `models.reference.mix_into`). TRL merges with mergekit; we merge
in-process and refuse the methods that need mergekit's machinery (ties, dare_ties) with a one-line error.

Not here: the callbacks every trainer installs itself (progress, reports, checkpoints: `trainers/`, `reporting/`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import torch
from transformers import TrainerCallback

from posttrain.errors import UserError

logger = logging.getLogger(__name__)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al., 2024): at every step where global_step % args.ref_model_sync_steps == 0,
    ref_model ← α·policy + (1−α)·ref_model with α = args.ref_model_mixup_alpha."""

    def __init__(self, ref_model: torch.nn.Module | None, accelerator=None):
        self.ref_model, self.accelerator = ref_model, accelerator

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from posttrain.models.reference import mix_into

        if self.ref_model is None:
            return
        steps, alpha = getattr(args, "ref_model_sync_steps", None), getattr(args, "ref_model_mixup_alpha", None)
        if steps is None or alpha is None:
            raise UserError(f"SyncRefModelCallback reads ref_model_sync_steps and ref_model_mixup_alpha from the "
                            f"trainer's config, and {type(args).__name__} has none; use a DPO/KTO config.")
        if state.global_step % steps == 0:
            policy = self.accelerator.unwrap_model(model) if self.accelerator is not None else _unwrap(model)
            mix_into(self.ref_model, policy, alpha)


class LogCompletionsCallback(TrainerCallback):
    """Every `freq` optimizer steps (default: the config's eval_steps), generate a completion for each prompt of
    the trainer's eval dataset (its first `num_prompts`) with `generation_config` (default: the model's), and add
    (step, prompt, completion) rows to `self.table`. Rows are appended to output_dir/logged_completions.jsonl and,
    with report_to wandb, logged as the W&B table "completions". The eval dataset needs a `prompt` column (text
    or messages), a tokenised `prompt_ids` column (preference trainers), or SFT's tokenised prompt-completion rows
    (the prompt is the untrained prefix: completion_mask 0 or labels -100)."""

    def __init__(self, trainer, generation_config=None, num_prompts: int | None = None, freq: int | None = None):
        if trainer.eval_dataset is None:
            raise ValueError("Trainer must have an evaluation dataset to use the LogCompletionsCallback.")
        self.trainer, self.generation_config, self.freq = trainer, generation_config, freq
        dataset = trainer.eval_dataset
        if num_prompts is not None:
            dataset = dataset.select(range(min(num_prompts, len(dataset))))
        names = dataset.column_names
        sft_rows = "input_ids" in names and ("completion_mask" in names or "labels" in names)
        if "prompt" not in names and "prompt_ids" not in names and not sft_rows:
            raise UserError(f"LogCompletionsCallback needs prompts in the eval dataset: a 'prompt' or 'prompt_ids' "
                            f"column, or SFT's tokenised prompt-completion rows; it has {names}.")
        self.eval_dataset = dataset
        self.table: list[tuple[str, str, str]] = []
        self._last_logged_step = -1

    def _prompt_ids(self, tokenizer) -> list[list[int]]:
        from posttrain.data.tokenize import tokenize_prompt

        names = self.eval_dataset.column_names
        if "prompt_ids" in names:
            return [list(ids) for ids in self.eval_dataset["prompt_ids"]]
        if "prompt" in names:
            return [tokenize_prompt(tokenizer, prompt) for prompt in self.eval_dataset["prompt"]]
        prompts = []  # SFT rows: the prompt is the untrained prefix (completion_mask 0) of input_ids
        if "completion_mask" in names:
            masks = [list(mask) for mask in self.eval_dataset["completion_mask"]]
        else:  # TRL 1.16's prepared form: labels with -100 on the untrained tokens
            masks = [[int(label != -100) for label in labels] for labels in self.eval_dataset["labels"]]
        for ids, mask in zip(self.eval_dataset["input_ids"], masks):
            start = mask.index(1) if 1 in mask else 0
            if start == 0:
                raise UserError("LogCompletionsCallback: an eval row has no prompt (language-modelling text trains "
                                "every token); give prompt-completion eval data.")
            prompts.append(list(ids[:start]))
        return prompts

    @torch.no_grad()
    def _generate(self, model, tokenizer, prompt_ids: list[list[int]], batch_size: int) -> list[str]:
        from posttrain.rollout.hf import left_pad

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        completions = []
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = left_pad(prompt_ids[start:start + batch_size], pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=self.generation_config, pad_token_id=pad)
            completions += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return completions

    def on_step_end(self, args, state, control, **kwargs):
        freq = self.freq or state.eval_steps or args.eval_steps
        if state.global_step == self._last_logged_step or not freq or state.global_step % freq:
            return
        from accelerate.utils import gather_object

        tokenizer = kwargs.get("processing_class") or self.trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        accelerator = self.trainer.accelerator
        model = accelerator.unwrap_model(self.trainer.model_wrapped)
        was_training = model.training
        model.eval()
        try:
            all_ids = self._prompt_ids(tokenizer)
            with accelerator.split_between_processes(list(range(len(all_ids)))) as mine:
                ids = [all_ids[i] for i in mine]
                completions = gather_object(self._generate(model, tokenizer, ids, args.per_device_eval_batch_size))
                prompts = gather_object([tokenizer.decode(p, skip_special_tokens=False) for p in ids])
        finally:
            model.train(was_training)
        self._last_logged_step = state.global_step
        if not accelerator.is_main_process:
            return
        rows = [(str(state.global_step), p, c) for p, c in zip(prompts, completions)]
        self.table.extend(rows)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "logged_completions.jsonl"), "a") as f:
            for step, prompt, completion in rows:
                f.write(json.dumps({"step": int(step), "prompt": prompt, "completion": completion}) + "\n")
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(columns=["step", "prompt", "completion"], data=self.table)})


class BEMACallback(TrainerCallback):
    """BEMA (Block et al., 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes"):

        θ'_t = α_t · (θ_t − θ_0) + EMA_t,    EMA_t = (1 − β_t) · EMA_{t−1} + β_t · θ_t,
        α_t = (ρ + γ·t)^(−η),                β_t = max((ρ + γ·t)^(−κ), min_ema_multiplier)

    with ρ = lag, γ = multiplier, η = bias_power, κ = ema_power, t the global step (as TRL counts it). θ_0 and the
    EMA start from the weights at step `update_after` (τ); after it, every `update_freq` steps (φ) the averaged
    weights θ' are recomputed into a copy of the model kept on `device`, saved to output_dir/bema at the end
    of training. Trainable parameters are averaged; frozen ones are copied. ema_power = 0 turns the EMA off
    (β = 1); a large bias_power turns the correction off (α → 0).
    """

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2, lag: int = 10,
                 update_after: int = 0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 device: str = "cpu"):
        if update_freq < 1:
            raise UserError(f"update_freq must be >= 1, got {update_freq}.")
        if lag + multiplier * update_after <= 0:
            raise UserError("lag + multiplier · t must be positive (it is raised to negative powers).")
        self.update_freq, self.ema_power, self.bias_power, self.lag = update_freq, ema_power, bias_power, lag
        self.update_after, self.multiplier, self.min_ema_multiplier = update_after, multiplier, min_ema_multiplier
        self.device = device
        self.running_model = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self.theta0: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}

    def ema_beta(self, step: int) -> float:
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def bema_alpha(self, step: int) -> float:
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        self.running_model = copy.deepcopy(model).to(self.device).eval()
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {n: p.detach().to(self.device, copy=True) for n, p in self._params.items()}
        self.ema = {n: t.clone() for n, t in self.theta0.items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step < self.update_after:
            return
        if step == self.update_after:  # burn-in over: θ_0 and the EMA restart from here
            for name, param in self._params.items():
                self.theta0[name].copy_(param.detach())
                self.ema[name].copy_(param.detach())
        elif (step - self.update_after) % self.update_freq == 0:
            self._update_bema_weights(step)

    @torch.no_grad()
    def _update_bema_weights(self, step: int) -> None:
        beta, alpha = self.ema_beta(step), self.bema_alpha(step)
        running = dict(self.running_model.named_parameters())
        for name, param in self._params.items():
            theta = param.detach().to(self.device, dtype=self.ema[name].dtype)
            self.ema[name].mul_(1 - beta).add_(theta, alpha=beta)
            running[name].copy_(self.ema[name] + alpha * (theta - self.theta0[name]))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.running_model is not None:
            path = os.path.join(args.output_dir, "bema")
            self.running_model.save_pretrained(path)
            logger.info("Saved the BEMA model to %s", path)


class MergeConfig:
    """How `MergeModelCallback` merges the policy (θ_p) with a target model (θ_t), tensor by tensor:

        linear  θ = (w_p·θ_p + w_t·θ_t) / (w_p + w_t)     policy_model_weight, target_model_weight (0.5 each)
        slerp   spherical interpolation from θ_t (t = 0) to θ_p (t = 1) at t = t_values (0.5); linear where the
                two tensors are (anti)parallel

    `target_model_path` defaults to the model the policy was loaded from; `dtype` is the saved dtype (float16).
    TRL's ties and dare_ties need mergekit's density schedules and are refused.
    """

    METHODS = ("linear", "slerp")

    def __init__(self, method: str = "linear"):
        if method in ("ties", "dare_ties"):
            raise UserError(f"Merge method {method!r} needs mergekit, which posttrain does not use; choose "
                            "'linear' or 'slerp', or merge the saved checkpoints with mergekit yourself.")
        if method not in self.METHODS:
            raise UserError(f"Unsupported merge method {method!r}; choose one of {', '.join(self.METHODS)}.")
        self.method = method
        self.policy_model_path: str | None = None
        self.target_model_path: str | None = None
        self.dtype = "float16"
        if method == "linear":
            self.policy_model_weight, self.target_model_weight = 0.5, 0.5
        else:
            self.t_values = 0.5

    def merge_tensor(self, policy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not policy.is_floating_point():
            return policy
        p, q = policy.double(), target.double()
        if self.method == "linear":
            total = self.policy_model_weight + self.target_model_weight
            if total == 0:
                raise UserError("policy_model_weight + target_model_weight is 0; give weights that sum to non-zero.")
            return (self.policy_model_weight * p + self.target_model_weight * q) / total
        t = self.t_values
        cos = torch.nn.functional.cosine_similarity(p.flatten(), q.flatten(), dim=0).clamp(-1, 1).item()
        if abs(cos) > 0.9995:
            return (1 - t) * q + t * p
        omega = math.acos(cos)
        return (math.sin((1 - t) * omega) * q + math.sin(t * omega) * p) / math.sin(omega)


class MergeModelCallback(TrainerCallback):
    """Merge the trained policy with `merge_config.target_model_path` (default: the model it started from) using
    `merge_config` (a `MergeConfig`, linear by default): at every save into checkpoint-N/merged when
    `merge_at_every_checkpoint`, else once at the end of training — into checkpoint-N/merged when that checkpoint
    was saved, else output_dir/merged. The tokenizer is saved with it; `push_to_hub` uploads the directory to
    the Hub repo "<output_dir>_checkpoint-N_merged"."""

    def __init__(self, merge_config: MergeConfig | None = None, merge_at_every_checkpoint: bool = False,
                 push_to_hub: bool = False):
        self.merge_config = merge_config or MergeConfig()
        self.merge_at_every_checkpoint, self.push_to_hub = merge_at_every_checkpoint, push_to_hub

    @torch.no_grad()
    def merge(self, model, out_dir: str, tokenizer=None) -> str:
        from posttrain.models import loading
        from posttrain.models.reference import is_peft_model

        model = _unwrap(model)
        if is_peft_model(model):
            model = copy.deepcopy(model).merge_and_unload()
        config = self.merge_config
        target_path = config.target_model_path or getattr(model.config, "_name_or_path", None)
        if not target_path:
            raise UserError("MergeModelCallback: the policy does not say which model it was loaded from; set "
                            "merge_config.target_model_path.")
        target = loading.load_pretrained_model(target_path, type(model) if hasattr(model, "config") else None)
        target_state = target.state_dict()
        merged = copy.deepcopy(model).cpu()
        for name, tensor in merged.state_dict().items():
            other = target_state.get(name)
            if other is None or other.shape != tensor.shape:
                raise UserError(f"Cannot merge with {target_path!r}: its weights differ in shape or name from the "
                                f"policy's at {name!r}; choose a target of the same architecture.")
            tensor.copy_(config.merge_tensor(tensor, other.to(tensor.device)).to(tensor.dtype))
        merged.to(getattr(torch, config.dtype)).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        config.policy_model_path, config.target_model_path = os.path.dirname(out_dir), target_path
        return out_dir

    def _merge_and_maybe_push(self, args, state, model, tokenizer, at_save: bool) -> None:
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        out = os.path.join(checkpoint if at_save or os.path.isdir(checkpoint) else args.output_dir, "merged")
        self.merge(model, out, tokenizer)
        logger.info("Merged the policy with %s into %s", self.merge_config.target_model_path, out)
        if self.push_to_hub:
            from huggingface_hub import HfApi

            repo = f"{args.output_dir}_checkpoint-{state.global_step}_merged"
            api = HfApi()
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(folder_path=out, repo_id=repo)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.merge_at_every_checkpoint:
            self._merge_and_maybe_push(args, state, model, processing_class, at_save=True)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.merge_at_every_checkpoint:
            self._merge_and_maybe_push(args, state, model, processing_class, at_save=False)
