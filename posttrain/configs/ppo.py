"""`PPOConfig`: options of classic RLHF PPO (the "N implementation details of RLHF with PPO" recipe), named as TRL
names them. Generation and reward options are GRPO's (`GRPOConfig` is the base); GRPO's loss options do not apply
and are hidden (`init=False`: not accepted, not listed by --help, not written to config.yaml).

Batching, as TRL's PPO: one rollout holds per_device_train_batch_size × gradient_accumulation_steps ×
num_mini_batches completions; it is trained on for num_ppo_epochs passes, each split into num_mini_batches
optimizer steps. Deprecated names from older guides (model_name, batch_size, mini_batch_size, ppo_epochs,
response_length, adap_kl_ctrl, init_kl_coef, target, horizon) are accepted with one FutureWarning each.

Not here: the algorithm (`trainers/ppo.py`), GAE and whitening (`algorithms/advantages.py`), losses
(`losses/value.py`).
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field

from posttrain.compat import accept_legacy_arguments
from posttrain.configs.base import check
from posttrain.configs.grpo import GRPOConfig, check_vllm

KL_ESTIMATORS = ("k1", "k3")


def _hidden(default):
    return field(default=default, init=False, metadata={"help": "Not used by PPO."})


@accept_legacy_arguments
@dataclass
class PPOConfig(GRPOConfig):
    """Configuration of `PPOTrainer` (every `transformers.TrainingArguments` field is accepted too)."""

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial AdamW learning rate (policy and critic)."})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt (the critic is the baseline, "
                                 "so 1 is enough)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the policy and "
                                  "the critic to 0 (PPO's ratio is 1 on the first pass only without dropout)."})
    sft_model_path: str | None = field(default=None, metadata={"help": "The policy to load when PPOTrainer is given "
                                       "no model."})
    value_model_name_or_path: str | None = field(default=None, metadata={"help": "The critic: a one-label sequence "
                                                 "classifier (e.g. the reward model). Default: the policy's "
                                                 "checkpoint with a new scalar head."})
    reward_model_path: str | None = field(default=None, metadata={"help": "A reward model scoring completions when "
                                          "no reward_funcs are given."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per pass over a rollout."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef after every rollout to keep the "
                              "policy's KL near kl_target (Ziegler et al. 2019); kl_coef is the starting value."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL (nats per completion) of adaptive_kl."})
    kl_horizon: float = field(default=10000.0, metadata={"help": "Completions over which adaptive_kl can change "
                              "kl_coef by about e^±0.2."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 (log π − log π_ref, unbiased) or k3 (unbiased, "
                              "always ≥ 0).", "choices": list(KL_ESTIMATORS)})
    cliprange: float = field(default=0.2, metadata={"help": "Clipping range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clipping range of the value around the rollout's "
                                   "values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor γ of GAE."})
    lam: float = field(default=0.95, metadata={"help": "λ of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (scale only) before "
                                 "GAE."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                              "completion that ends without EOS."})
    # GRPO options PPO does not use (steps_per_generation, generation_batch_size and num_iterations are derived).
    steps_per_generation: int | None = _hidden(None)
    generation_batch_size: int | None = _hidden(None)
    num_iterations: int = _hidden(1)
    scale_rewards: str = _hidden("group")
    multi_objective_aggregation: str = _hidden("sum_then_normalize")
    loss_type: str = _hidden("dapo")
    beta: float = _hidden(0.0)
    epsilon: float = _hidden(0.2)
    epsilon_high: float | None = _hidden(None)
    delta: float | None = _hidden(None)
    importance_sampling_level: str = _hidden("token")
    sapo_temperature_pos: float = _hidden(1.0)
    sapo_temperature_neg: float = _hidden(1.05)
    top_entropy_quantile: float = _hidden(1.0)
    sync_ref_model: bool = _hidden(False)
    ref_model_sync_steps: int = _hidden(512)
    ref_model_mixup_alpha: float = _hidden(0.6)
    # Deprecated names (older TRL PPOConfig): translated in __post_init__, never stored.
    model_name: InitVar[str | None] = None
    batch_size: InitVar[int | None] = None
    mini_batch_size: InitVar[int | None] = None
    ppo_epochs: InitVar[int | None] = None
    response_length: InitVar[int | None] = None
    adap_kl_ctrl: InitVar[bool | None] = None
    init_kl_coef: InitVar[float | None] = None
    target: InitVar[float | None] = None
    horizon: InitVar[float | None] = None

    def __post_init__(self, model_name=None, batch_size=None, mini_batch_size=None, ppo_epochs=None,
                      response_length=None, adap_kl_ctrl=None, init_kl_coef=None, target=None,
                      horizon=None) -> None:
        for old, new, value in (("adap_kl_ctrl", "adaptive_kl", adap_kl_ctrl), ("init_kl_coef", "kl_coef",
                                init_kl_coef), ("target", "kl_target", target), ("horizon", "kl_horizon", horizon)):
            if value is not None:
                _deprecated(old, new)
                setattr(self, new, value)
        if model_name is not None:
            _deprecated("model_name", "PPOTrainer(model=...) (or sft_model_path=...)")
            self.sft_model_path = self.sft_model_path or model_name
        if ppo_epochs is not None:
            _deprecated("ppo_epochs", "num_ppo_epochs")
            self.num_ppo_epochs = ppo_epochs
        if response_length is not None:
            _deprecated("response_length", "max_completion_length")
            self.max_completion_length = response_length
        if mini_batch_size is not None:
            _deprecated("mini_batch_size", "per_device_train_batch_size (× gradient_accumulation_steps per optimizer "
                                           "step)")
            self.per_device_train_batch_size = mini_batch_size
        if batch_size is not None:
            _deprecated("batch_size", "num_mini_batches (a rollout is per_device_train_batch_size × "
                                      "gradient_accumulation_steps × num_mini_batches completions)")
            step = self.per_device_train_batch_size * self.gradient_accumulation_steps
            check(batch_size % step == 0, f"batch_size ({batch_size}) must be a multiple of mini_batch_size × "
                                          f"gradient_accumulation_steps ({step}).")
            self.num_mini_batches = batch_size // step
        super().__post_init__()

    def _resolve_batching(self) -> None:
        """A rollout is per_device × GA × num_mini_batches completions, reused for num_ppo_epochs passes."""
        self.num_iterations = self.num_ppo_epochs
        self.steps_per_generation = self.gradient_accumulation_steps * self.num_mini_batches
        self.generation_batch_size = self.per_device_train_batch_size * self.steps_per_generation
        check(self.generation_batch_size % self.num_generations == 0,
              f"The rollout (per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches = "
              f"{self.generation_batch_size}) must be a multiple of num_generations ({self.num_generations}).")

    def validate(self) -> None:
        check(self.num_generations >= 1, f"num_generations must be >= 1, got {self.num_generations}.")
        check(self.kl_estimator in KL_ESTIMATORS,
              f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}.")
        check(self.num_ppo_epochs >= 1, f"num_ppo_epochs must be >= 1, got {self.num_ppo_epochs}.")
        check(self.num_mini_batches >= 1, f"num_mini_batches must be >= 1, got {self.num_mini_batches}.")
        check(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}.")
        check(not self.adaptive_kl or (self.kl_target > 0 and self.kl_horizon > 0),
              f"adaptive_kl needs kl_target > 0 and kl_horizon > 0, got {self.kl_target} and {self.kl_horizon}.")
        check(self.cliprange > 0, f"cliprange must be > 0, got {self.cliprange}.")
        check(self.cliprange_value > 0, f"cliprange_value must be > 0, got {self.cliprange_value}.")
        check(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}.")
        check(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}.")
        check(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}.")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}.")
        check(self.max_completion_length > 0, f"max_completion_length must be > 0, got {self.max_completion_length}.")
        check_vllm(self)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"PPOConfig({old}=...) is deprecated; use {new}.", FutureWarning, stacklevel=5)
