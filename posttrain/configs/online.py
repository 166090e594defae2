"""The rollout part every online config shares, and the generation-batch part of the group methods.

`OnlineConfig` (generation, vLLM, rewards, the completions table) is the base of the four sibling configs —
`GRPOConfig`, `RLOOConfig`, `OnlineDPOConfig`, `PPOConfig` — each of which declares only the options its trainer
uses: an option of a sibling is refused in one line naming the trainers that take it (`configs/base.py`).
`GroupRolloutConfig` adds what the methods that sample a group per prompt and reuse a generation batch share
(GRPO, RLOO, online DPO): steps_per_generation / generation_batch_size, num_iterations, and TR-DPO reference sync.
PPO derives its batching from num_mini_batches and num_ppo_epochs instead (`configs/ppo.py`).
`ToolRolloutConfig` adds the options of multi-turn tool-calling rollouts (`rollout/agentic.py`), for the trainers that
take `tools=` / `environment_factory=` / `rollout_func=` (GRPO, RLOO); online DPO and PPO refuse them.

Not here: the options of one method (its own module), the rollout machinery (`trainers/online.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain.configs.base import PostTrainConfig, check, json_option, posttrain_config

VLLM_MODES = ("colocate", "server")


@posttrain_config
@dataclass
class OnlineConfig(PostTrainConfig):
    """Options every online trainer shares (and every `transformers.TrainingArguments` field)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep extra columns: reward functions "
                                        "receive them (e.g. 'answer')."})
    # generation
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (group size G)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompts longer than this keep their "
                                          "last tokens."})
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens generated per completion."})
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
    log_completions: bool = field(default=False, metadata={"help": "Save a table of prompts, completions and "
                                  "rewards at every logging step (output_dir/completions.jsonl)."})

    def __post_init__(self) -> None:
        self.generation_kwargs = json_option(self.generation_kwargs, "generation_kwargs")
        super().__post_init__()
        self.resolve_batching()
        self.validate_rollout()

    def resolve_batching(self) -> None:
        """Set steps_per_generation, generation_batch_size and num_iterations (each config decides how)."""
        raise NotImplementedError

    def validate_rollout(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}.")
        check(self.max_completion_length > 0, f"max_completion_length must be > 0, got {self.max_completion_length}.")
        check(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}.")
        check_vllm(self)


@posttrain_config
@dataclass
class GroupRolloutConfig(OnlineConfig):
    """What GRPO, RLOO and online DPO share beyond the rollout: a generation batch of whole groups, reused for
    num_iterations passes over steps_per_generation micro-steps, and TR-DPO reference sync.

    Batching: each optimizer micro-step trains on `per_device_train_batch_size` completions; a generation batch of
    `per_device_train_batch_size × steps_per_generation` completions (unique prompts × num_generations) is sampled
    at once and reused for `num_iterations` passes."""

    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-steps trained per generation "
                                             "batch (default: gradient_accumulation_steps, raised if needed so the "
                                             "generation batch holds whole groups)."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per generation batch "
                                              "(alternative to steps_per_generation)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation batch (μ in the GRPO "
                                "paper); > 1 reuses completions with old log-probs."})
    sync_ref_model: bool = field(default=False, metadata={"help": "Mix the policy into the reference every "
                                 "ref_model_sync_steps steps (TR-DPO)."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference updates."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref ← α·policy + (1−α)·ref."})

    def resolve_batching(self) -> None:
        """Choose steps_per_generation so that a generation batch (all processes together; a group may span
        processes) holds whole groups of num_generations."""
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


@posttrain_config
@dataclass
class ToolRolloutConfig(GroupRolloutConfig):
    """Options of tool-calling (agentic) rollouts: the tools and environments by import path (the trainer's `tools=`
    and `environment_factory=` take the objects themselves), how many tool rounds, and how long a tool may run."""

    tools: list[str] | None = field(default=None, metadata={"help": "Tools the model may call, as "
                                    "'module:function' paths (the trainer's tools= takes the functions)."})
    environment_factory: str | None = field(default=None, metadata={"help": "An environment class or factory as a "
                                            "'module:Class' path: one instance per rollout, its public methods "
                                            "are tools."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={"help": "Most tool-calling rounds per "
                                                    "rollout (None: until the model stops calling tools or "
                                                    "max_completion_length is reached)."})
    tool_call_timeout: float | None = field(default=30.0, metadata={"help": "Seconds a tool call may run before "
                                            "the model is told it timed out (None: no limit)."})
    chat_template_path: str | None = field(default=None, metadata={"help": "A .jinja file, a tokenizer directory or "
                                           "'posttrain/chatml-tools' (ChatML with Hermes-form tool calls) whose "
                                           "chat template replaces the tokenizer's."})

    def validate_rollout(self) -> None:
        super().validate_rollout()
        check(self.max_tool_calling_iterations is None or self.max_tool_calling_iterations >= 0,
              f"max_tool_calling_iterations must be >= 0, got {self.max_tool_calling_iterations}.")
        check(self.tool_call_timeout is None or self.tool_call_timeout > 0,
              f"tool_call_timeout must be > 0 seconds, got {self.tool_call_timeout}.")
        if isinstance(self.tools, str):
            self.tools = [self.tools]


def check_vllm(config: OnlineConfig) -> None:
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
