"""`PPOConfig`: options of classic RLHF PPO (the "N implementation details of RLHF with PPO" recipe), named as TRL
names them. Generation and reward options are the shared rollout part (`configs/online.py`); GRPO's batching and
loss options do not apply and are refused.

Batching, as TRL's PPO: one rollout holds per_device_train_batch_size × gradient_accumulation_steps ×
num_mini_batches completions; it is trained on for num_ppo_epochs passes, each split into num_mini_batches
optimizer steps. Older guides' option names (batch_size, ppo_epochs, …) are translated by `compat/ppo.py`.

Not here: the algorithm (`trainers/ppo.py`), GAE and whitening (`algorithms/advantages.py`), losses
(`losses/value.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.compat.ppo import translate_ppo_config_options
from posttrain.configs.base import check, check_bounds, posttrain_config
from posttrain.configs.online import OnlineConfig

KL_ESTIMATORS = ("k1", "k3")


@posttrain_config
@dataclass
class PPOConfig(OnlineConfig):
    """Configuration of `PPOTrainer` (every `transformers.TrainingArguments` field and the shared rollout options
    are accepted too)."""

    translate_legacy_options = staticmethod(translate_ppo_config_options)  # older TRL names (compat/ppo.py)

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
    total_episodes: int | None = field(default=None, metadata={"help": "Completions to train on in all (TRL's "
                                       "episodes): sets max_steps to the optimizer steps of ⌈total_episodes / "
                                       "rollout size⌉ rollouts (each num_mini_batches × num_ppo_epochs steps). "
                                       "Default: num_train_epochs over the dataset."})
    stop_token: str | None = field(default=None, metadata={"help": "TRL: 'eos' ends each completion at its first "
                                   "EOS. posttrain always does (generation stops at EOS), so None and 'eos' are the "
                                   "same here.", "choices": [None, "eos"]})
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

    @property
    def num_iterations(self) -> int:  # the shared rollout cycle's name for num_ppo_epochs
        return self.num_ppo_epochs

    @property
    def steps_per_generation(self) -> int:  # micro-steps per rollout pass
        return self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def generation_batch_size(self) -> int:  # completions per rollout and process
        return self.per_device_train_batch_size * self.steps_per_generation

    def resolve_batching(self) -> None:
        """A rollout is per_device × GA × num_mini_batches completions, reused for num_ppo_epochs passes;
        total_episodes (completions over all processes) → max_steps."""
        check(self.generation_batch_size % self.num_generations == 0,
              f"The rollout (per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches = "
              f"{self.generation_batch_size}) must be a multiple of num_generations ({self.num_generations}).")
        check(self.stop_token in (None, "eos"), f"stop_token must be 'eos' or None, got {self.stop_token!r}.")
        if self.total_episodes is not None:
            check(self.total_episodes >= 1, f"total_episodes must be >= 1, got {self.total_episodes}.")
            rollouts = -(-self.total_episodes // (self.generation_batch_size * self.world_size))
            steps = rollouts * self.num_mini_batches * self.num_ppo_epochs
            check(self.max_steps in (-1, steps), f"Set total_episodes or max_steps, not both (total_episodes="
                                                 f"{self.total_episodes} means max_steps={steps}).")
            self.max_steps = steps

    def validate(self) -> None:
        check_bounds(self, "num_generations >= 1", "num_ppo_epochs >= 1", "num_mini_batches >= 1", "kl_coef >= 0",
                     "cliprange > 0", "cliprange_value > 0", "vf_coef >= 0")
        check(self.kl_estimator in KL_ESTIMATORS,
              f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}.")
        check(not self.adaptive_kl or (self.kl_target > 0 and self.kl_horizon > 0),
              f"adaptive_kl needs kl_target > 0 and kl_horizon > 0, got {self.kl_target} and {self.kl_horizon}.")
        check(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}.")
        check(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}.")

