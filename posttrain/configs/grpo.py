"""`GRPOConfig`: options of Group Relative Policy Optimization and its loss variants, named as TRL names them.

Not here: the losses (`losses/policy.py`), advantages (`algorithms/advantages.py`), rollouts (`rollout/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.compat import accept_legacy_arguments
from posttrain.configs.base import PostTrainConfig, check

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
VLLM_MODES = ("colocate", "server")


@accept_legacy_arguments
@dataclass
class GRPOConfig(PostTrainConfig):
    """Configuration of `GRPOTrainer` (every `transformers.TrainingArguments` field is accepted too).

    Batching: each optimizer micro-step trains on `per_device_train_batch_size` completions; a generation batch of
    `per_device_train_batch_size × steps_per_generation` completions (unique prompts × num_generations) is sampled
    at once and reused for `num_iterations` passes.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep extra columns: reward functions "
                                        "receive them (e.g. 'answer')."})
    # generation
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (group size G, ≥ 2)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompts longer than this keep their "
                                          "last tokens."})
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens generated per completion."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-steps trained per generation "
                                             "batch (default: gradient_accumulation_steps, raised if needed so the "
                                             "generation batch holds whole groups)."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per generation batch "
                                              "(alternative to steps_per_generation)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation batch (μ in the GRPO "
                                "paper); > 1 reuses completions with old log-probs."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1 = none)."})
    generation_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra `generate` options "
                                                 "(JSON on the command line); they override the above."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (GPU; needs the vllm extra)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate: a vLLM engine inside each training "
                           "process, sharing its GPU; server: a `posttrain vllm-serve` server on other GPUs (or "
                           "machines), sent the policy's weights over HTTP every optimizer step.",
                           "choices": list(VLLM_MODES)})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Share of GPU memory the colocated "
                                               "vLLM engine may take."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vLLM's context length (default: "
                                              "the model's)."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Server mode: the server's URL "
                                             "(e.g. http://10.0.0.2:8000); overrides vllm_server_host and "
                                             "vllm_server_port."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: the server's port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Server mode: seconds to wait for the "
                                       "server to answer when the trainer starts."})
    # rewards
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Reward functions when none are passed "
                                           "to the trainer: built-in names (accuracy_reward, format_reward, "
                                           "think_format_reward, …), module:function paths, or reward-model ids."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function."})
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "A reward model (one-label "
                                                  "sequence classifier: Hub id or local directory) scored after "
                                                  "reward_funcs."})
    scale_rewards: str = field(default="group", metadata={"help": "Divide advantages by the std of the group, "
                               "of the batch, or none (Dr. GRPO).", "choices": list(SCALE_REWARDS)})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "sum_then_normalize (weighted sum, then group normalisation) or normalize_then_sum (GDPO).",
        "choices": ["sum_then_normalize", "normalize_then_sum"]})
    # loss
    loss_type: str = field(default="dapo", metadata={"help": "One of: " + ", ".join(GRPO_LOSS_TYPES) + ".",
                                                     "choices": list(GRPO_LOSS_TYPES)})
    beta: float = field(default=0.0, metadata={"help": "Weight of the k3 KL to the reference (0 = no reference "
                        "model is loaded)."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the per-token KL by the "
                                         "importance ratio πθ/π_old (DeepSeek-V3.2: an unbiased reverse-KL "
                                         "gradient off-policy; changes the gradient even at ratio 1). As TRL."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range ε."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default ε; DAPO "
                                       "uses 0.28)."})
    delta: float | None = field(default=None, metadata={"help": "Two-sided clipping: cap the ratio at δ."})
    importance_sampling_level: str = field(default="token", metadata={"help": "token, or sequence (GSPO).",
                                           "choices": ["token", "sequence"]})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature for A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature for A ≤ 0."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Exclude completions that hit "
                                             "max_completion_length without EOS from the loss."})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "Train only on the tokens whose entropy "
                                        "is in this top fraction (0.2 in the 80/20 paper; 1 = all)."})
    sync_ref_model: bool = field(default=False, metadata={"help": "Mix the policy into the reference every "
                                 "ref_model_sync_steps steps."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference updates."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref ← α·policy + (1−α)·ref."})
    log_completions: bool = field(default=False, metadata={"help": "Save a table of prompts, completions and "
                                  "rewards at every logging step (output_dir/completions.jsonl)."})

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if isinstance(self.generation_kwargs, str):
            import json

            self.generation_kwargs = json.loads(self.generation_kwargs)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        super().__post_init__()
        self._resolve_batching()

    def _resolve_batching(self) -> None:
        """Choose steps_per_generation so that a generation batch (all processes together; a group may span
        processes) holds whole groups of num_generations."""
        import math

        per_step = self.per_device_train_batch_size
        world = self.world_size
        if self.generation_batch_size is not None:
            # both may be set only when they agree (a saved config.yaml holds both)
            check(self.steps_per_generation is None
                  or self.generation_batch_size == per_step * self.steps_per_generation,
                  "Set generation_batch_size or steps_per_generation, not both.")
            check(self.generation_batch_size % per_step == 0,
                  f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                  f"per_device_train_batch_size ({per_step}).")
            self.steps_per_generation = self.generation_batch_size // per_step
        elif self.steps_per_generation is None:
            ga = self.gradient_accumulation_steps
            needed = self.num_generations // math.gcd(per_step * ga * world, self.num_generations)
            self.steps_per_generation = ga * needed
        self.generation_batch_size = per_step * self.steps_per_generation
        processes = f" × {world} processes" if world > 1 else ""
        check(self.generation_batch_size * world % self.num_generations == 0,
              f"The generation batch (per_device_train_batch_size × steps_per_generation{processes} = "
              f"{self.generation_batch_size * world}) must be a multiple of num_generations ({self.num_generations}).")

    def validate(self) -> None:
        check(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs siblings to compare), "
                                         f"got {self.num_generations}.")
        check(self.loss_type in GRPO_LOSS_TYPES,
              f"Unknown loss_type {self.loss_type!r} for GRPO; choose one of: {', '.join(GRPO_LOSS_TYPES)}.")
        check(self.scale_rewards in SCALE_REWARDS,
              f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}.")
        check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}.")
        check(self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}.")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}.")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}.")
        check(self.max_completion_length > 0, f"max_completion_length must be > 0, got {self.max_completion_length}.")
        check(0 < self.top_entropy_quantile <= 1, f"top_entropy_quantile must be in (0, 1], got "
                                                  f"{self.top_entropy_quantile}.")
        check(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}.")
        check_vllm(self)


def check_vllm(config) -> None:
    """use_vllm: colocate mode needs the vllm package here; server mode needs only a reachable server (checked when
    the trainer starts), not vllm in the training process. One-line errors."""
    if not config.use_vllm:
        return
    check(config.vllm_mode in VLLM_MODES, f"vllm_mode must be one of {', '.join(VLLM_MODES)}, got "
                                          f"{config.vllm_mode!r}.")
    if config.vllm_mode == "server":
        url = config.vllm_server_base_url
        check(url is None or url.startswith(("http://", "https://")), f"vllm_server_base_url must start with "
                                                                      f"http:// or https://, got {url!r}.")
        check(0 < config.vllm_server_port < 65536, f"vllm_server_port must be in [1, 65535], got "
                                                   f"{config.vllm_server_port}.")
        check(config.vllm_server_timeout > 0, f"vllm_server_timeout must be > 0 seconds, got "
                                              f"{config.vllm_server_timeout}.")
        return
    check(_has_vllm(), "use_vllm=True needs the vllm package (pip install 'posttrain[vllm]') and a CUDA GPU; or "
                       "generate on a `posttrain vllm-serve` server with vllm_mode='server'.")
    check(0 < config.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization must be in (0, 1), got "
                                                      f"{config.vllm_gpu_memory_utilization}.")


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
