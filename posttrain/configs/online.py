"""The rollout part every online config shares, and the generation-batch part of the group methods.

`OnlineConfig` (generation, vLLM, rewards, the completions table) is the base of the four sibling configs —
`GRPOConfig`, `RLOOConfig`, `OnlineDPOConfig`, `PPOConfig` — each of which declares only the options its trainer
uses: an option of a sibling is refused in one line naming the trainers that take it (`configs/base.py`).
`GroupRolloutConfig` adds what the methods that sample a group per prompt and reuse a generation batch share
(GRPO, RLOO, online DPO): steps_per_generation / generation_batch_size, num_iterations, and TR-DPO reference sync.
PPO derives its batching from num_mini_batches and num_ppo_epochs instead (`configs/ppo.py`).
`ToolRolloutConfig` adds the options of multi-turn tool-calling rollouts (`rollout/agentic.py`), for the trainers that
take `tools=` / `environment_factory=` / `rollout_func=` (GRPO, RLOO, distillation); online DPO and PPO refuse them.
`RenderedRolloutConfig` adds prompt rendering, padding and the printed completions sample (GRPO, RLOO, distillation,
GKD); `ScoredGroupConfig` what GRPO and RLOO add beyond it.

Not here: the options of one method (its own module), the rollout machinery (`trainers/online.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain.configs.base import (PostTrainConfig, check, check_bounds, json_option, max_tokens_per_backward_field,
                                    posttrain_config)

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
    max_completion_length: int = field(default=512, metadata={"help": "Most tokens generated per completion (512, as "
                                       "TRL: a cap, so short answers cost the same as with 256)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1 = none)."})
    generation_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra `generate` options "
                                                 "(JSON on the command line); they override the above."})
    cache_implementation: str | None = field(default=None, metadata={"help": "transformers generation: the KV-cache "
                                             "implementation passed to `generate` (e.g. 'static'); vLLM ignores "
                                             "it, as TRL."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed ZeRO-3: gather the policy's "
                                            "weights for generation (fast). False generates from the shards (slower, "
                                            "less memory); not with vLLM."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (GPU; needs the vllm extra)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate: a vLLM engine inside each training "
                           "process, sharing its GPU; server: a `posttrain vllm-serve` server on other GPUs (or "
                           "machines), sent the policy's weights over HTTP every optimizer step.",
                           "choices": list(VLLM_MODES)})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Share of GPU memory the colocated "
                                               "vLLM engine may take."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vLLM's context length (default: "
                                              "the model's)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate mode, one training process: GPUs "
                                           "the engine shards the model over (server mode: the server's "
                                           "--tensor_parallel_size)."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "Colocate mode: vLLM's own model code ('vllm') or "
                                 "the transformers backend ('transformers').", "choices": ["vllm", "transformers"]})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Colocate mode: offload the engine's "
                                         "weights and free its cache between rollouts (less GPU memory while "
                                         "training; waking costs a host-device copy)."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "Constrain every completion to "
                                                      "this regular expression (vLLM structured outputs)."})
    vllm_group_port: int = field(default=51216, metadata={"help": "TRL's NCCL weight-update port. posttrain's server "
                                 "receives weights over HTTP (`rollout/client.py`), so only the default is accepted."})
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
        check_bounds(self, "temperature > 0", "max_completion_length > 0", "num_iterations >= 1")
        check_vllm(self)


@posttrain_config
@dataclass
class GroupRolloutConfig(OnlineConfig):
    """What GRPO, RLOO and online DPO share beyond the rollout: TR-DPO reference sync, and the batching — each
    optimizer micro-step trains on `per_device_train_batch_size` completions; a generation batch of
    `per_device_train_batch_size × steps_per_generation` completions (whole groups: unique prompts × num_generations)
    is sampled at once and reused for `num_iterations` passes."""

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
    """Options of rollouts from chat prompts, tool-calling (agentic) ones included (GRPO, RLOO, distillation): the
    tools and environments by import path (the trainer's `tools=` and `environment_factory=` take the objects
    themselves), how many tool rounds, how long a tool may run, the chat template and its keyword arguments,
    padding, and the completions sample printed at each logging step."""

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


VLLM_ONLY_DEFAULTS = {"vllm_tensor_parallel_size": 1, "vllm_model_impl": "vllm", "vllm_enable_sleep_mode": False,
                      "vllm_structured_outputs_regex": None}


@posttrain_config
@dataclass
class RenderedRolloutConfig(ToolRolloutConfig):
    """What the trainers that render chat prompts themselves and print a sample of each rollout share (GRPO, RLOO,
    on-policy distillation and GKD, as TRL's configs of the same names): chat_template_kwargs, pad_to_multiple_of,
    and the printed completions sample (num_completions_to_print, log_unique_prompts). The online base reads them
    (`trainers/online.py`), so they act the same in every trainer that takes them."""

    chat_template_kwargs: dict | str | None = field(default=None, metadata={"help": "Keyword arguments for the "
                                                    "chat template when prompts are rendered (JSON on the command "
                                                    "line), e.g. '{\"enable_thinking\": false}'. A dataset column "
                                                    "'chat_template_kwargs' adds per-row values, which win."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Pad prompt and completion ids "
                                                 "to a multiple of this (fewer distinct shapes for compiled "
                                                 "kernels). auto: 128 on Neuron devices, else no padding."})
    num_completions_to_print: int | None = field(default=None, metadata={"help": "With log_completions: how many "
                                                 "completions of the last rollout are printed (a table) at each "
                                                 "logging step, as TRL (None: all of them; 0: none). "
                                                 "output_dir/completions.jsonl keeps every one."})
    log_unique_prompts: bool = field(default=False, metadata={"help": "With log_completions: one row per distinct "
                                     "prompt in the printed sample (its first completion), instead of every "
                                     "completion (completions.jsonl keeps every one)."})

    def validate_rollout(self) -> None:
        super().validate_rollout()
        self.chat_template_kwargs = json_option(self.chat_template_kwargs, "chat_template_kwargs")
        check(self.chat_template_kwargs is None or isinstance(self.chat_template_kwargs, dict),
              f"chat_template_kwargs must be a mapping, got {self.chat_template_kwargs!r}.")
        if isinstance(self.pad_to_multiple_of, str):  # the command line gives a string
            value = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = ("auto" if value == "auto" else None if value in ("none", "null")
                                       else int(value))
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = 128 if _on_neuron() else None
        check(self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1,
              f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}.")
        check(self.num_completions_to_print is None or self.num_completions_to_print >= 0,
              f"num_completions_to_print must be >= 0, got {self.num_completions_to_print}.")


@posttrain_config
@dataclass
class ScoredGroupConfig(RenderedRolloutConfig):
    """What GRPO and RLOO (the methods that score a group with reward functions) add to the rendered rollout: the
    eval group size, images in the completions table, and generation engines of TRL's they do not offer."""

    num_generations_eval: int | None = field(default=None, metadata={"help": "Completions per prompt in evaluation "
                                             "(default num_generations)."})
    log_multimodal: bool = field(default=True, metadata={"help": "Log images with completions (posttrain's rollouts "
                                 "are text-only: nothing to log either way)."})
    use_transformers_continuous_batching: bool = field(default=False, metadata={"help": "TRL: generate with "
                                                       "transformers' continuous batching. Not offered: use_vllm "
                                                       "(or the default generate, which shares each prompt's "
                                                       "prefill); True is refused."})
    transformers_continuous_batching_config: dict | None = field(default=None, metadata={"help": "Options of "
                                                                 "use_transformers_continuous_batching (refused)."})
    use_transformers_paged: bool = field(default=False, metadata={"help": "Deprecated TRL name of "
                                         "use_transformers_continuous_batching (refused)."})
    max_tokens_per_backward: int | None = max_tokens_per_backward_field("rows")

    def validate_rollout(self) -> None:
        super().validate_rollout()
        check(not (self.use_transformers_continuous_batching or self.use_transformers_paged
                   or self.transformers_continuous_batching_config),
              "use_transformers_continuous_batching is not offered by posttrain: generation shares each prompt's "
              "prefill already; for faster rollouts set use_vllm=True. Remove the option.")
        check(self.num_generations_eval is None or self.num_generations_eval >= 1,
              f"num_generations_eval must be >= 1, got {self.num_generations_eval}.")


def _on_neuron() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_neuronx") is not None


def check_vllm(config: OnlineConfig) -> None:
    """The values of the vLLM options (one-line errors). Whether vLLM can run here (the package, a GPU, a server) is
    checked when the trainer starts (`check_vllm_use`), so a config can be written on a machine without vLLM."""
    check(config.vllm_group_port == 51216 or not config.use_vllm,
          f"vllm_group_port={config.vllm_group_port}: posttrain's generation server receives the weights over HTTP, "
          "not over an NCCL group, so there is no port to choose; remove vllm_group_port.")
    check_bounds(config, "vllm_tensor_parallel_size >= 1")
    check(config.vllm_model_impl in ("vllm", "transformers"), f"vllm_model_impl must be 'vllm' or 'transformers', "
                                                               f"got {config.vllm_model_impl!r}.")
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
    check(0 < config.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization must be in (0, 1), got "
                                                      f"{config.vllm_gpu_memory_utilization}.")


def check_vllm_use(config: OnlineConfig) -> None:
    """When a trainer starts: a vLLM-only option set without use_vllm has nothing to act on, colocate mode needs the
    vllm package here, and the options of a colocated engine belong to the server in server mode. One line each."""
    changed = [name for name, default in VLLM_ONLY_DEFAULTS.items() if getattr(config, name) != default]
    if not config.use_vllm:
        check(not changed, f"{changed[0] if changed else ''} applies to vLLM generation only; set use_vllm=True or "
                           "remove it.")
        return
    if config.vllm_mode == "server":
        server_side = [n for n in changed if n in ("vllm_tensor_parallel_size", "vllm_model_impl",
                                                    "vllm_enable_sleep_mode")]
        check(not server_side, f"{server_side[0] if server_side else ''} is an option of the generation server in "
                               "vllm_mode='server': pass it to `posttrain vllm-serve` instead.")
        return
    check(_has_vllm(), "use_vllm=True needs the vllm package (pip install 'posttrain[vllm]') and a CUDA GPU; or "
                       "generate on a `posttrain vllm-serve` server with vllm_mode='server'.")
    check(config.vllm_tensor_parallel_size == 1 or config.world_size == 1,
          f"vllm_tensor_parallel_size={config.vllm_tensor_parallel_size} with {config.world_size} training "
          "processes: each process runs its own colocated engine on its own GPU; use vllm_mode='server' for a "
          "tensor-parallel engine.")
    check(config.ds3_gather_for_generation, "ds3_gather_for_generation=False is not compatible with vLLM "
                                            "generation (the engine needs whole weights); remove it.")


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
