"""What TRL users' code reads and sets on the online trainers (issue 27): the trainer attributes code inspects,
the reward-function logging hooks, chat_template_kwargs (config and per-row column), num_generations_eval,
pad_to_multiple_of, beam-search sampling (vLLM: refused in one line), train_dataset=None refused early, PPO's total_episodes and
Online DPO's max_length / reward_model_path."""

import math

import pytest
import torch

from posttrain.configs.grpo import GRPOConfig
from posttrain.configs.online_dpo import OnlineDPOConfig
from posttrain.configs.ppo import PPOConfig
from posttrain.configs.rloo import RLOOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.trainers.grpo import GRPOTrainer
from posttrain.trainers.rloo import RLOOTrainer

MODEL = "posttrain/tiny"


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def _prompts(n=8):
    return load_builtin_dataset("posttrain/arith-prompts", split=f"train[:{n}]")


def test_attributes_and_logging_hooks(tmp_path):
    seen = {}

    def scored(completions, log_extra, log_metric, **kwargs):
        log_extra("length", [len(c) for c in completions])
        log_metric("my_metric", 3.0)
        log_metric("my_metric", 5.0)
        seen["called"] = True
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(MODEL, reward_funcs=[scored, "length_reward"],
                          args=_args(tmp_path, log_completions=True), train_dataset=_prompts())
    assert trainer.reward_funcs[0] is scored and trainer.reward_processing_classes == [None, None]
    assert trainer.use_vllm is False and trainer.aux_loss_enabled is False
    assert trainer.reward_weights.tolist() == [1.0, 1.0]
    assert trainer.reward_func_names[0] == "scored"
    trainer.train()
    assert seen["called"] and trainer.state.log_history[0]["my_metric"] == pytest.approx(4.0)
    rows = [line for line in open(tmp_path / "out" / "completions.jsonl")]
    assert '"length"' in rows[0]  # the log_extra column is in the completions table
    assert "length" in trainer._logs["extra"] and len(trainer._logs["completion"]) == 4  # TRL's _logs view
    tags = trainer.model.model_tags if hasattr(trainer.model, "model_tags") else None
    assert tags is None or {"trl", "grpo"} <= set(tags)


def test_train_dataset_is_required_and_beam_search_samples(tmp_path):
    from posttrain.rollout.engine import sampling_options

    with pytest.raises(ValueError, match="`train_dataset` is required"):
        RLOOTrainer(MODEL, reward_funcs="length_reward", args=_args(tmp_path))
    # as TRL: beam-search sampling through transformers' generate (one completion per row), trained on
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                          args=_args(tmp_path, generation_kwargs={"do_sample": True, "num_beams": 2,
                                                                  "length_penalty": -0.1}))
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="num_beams=2: vLLM's sampling has no beam search"):
        sampling_options({"num_beams": 2})


def test_chat_template_kwargs_reach_the_template(tmp_path):
    seen = []
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                          args=_args(tmp_path, chat_template_kwargs='{"enable_thinking": false}'))
    tok = trainer.processing_class
    original = tok.apply_chat_template

    def spy(*args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k in ("enable_thinking", "custom")})
        return original(*args, **kwargs)

    tok.apply_chat_template = spy
    messages = [{"role": "user", "content": "hi"}]
    trainer._prompt_ids(messages)
    trainer._prompt_ids(messages, {"custom": 1, "enable_thinking": True})  # the row's own column wins
    assert seen == [{"enable_thinking": False}, {"enable_thinking": True, "custom": 1}]


def test_num_generations_eval_and_padding(tmp_path):
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(), eval_dataset=_prompts(4),
                          args=_args(tmp_path, num_generations_eval=2, per_device_eval_batch_size=4,
                                     pad_to_multiple_of=8))
    assert trainer.args.pad_to_multiple_of == 8
    rows = next(iter(trainer.get_eval_dataloader()))
    assert [r["prompt"] for r in rows][0] == rows[1]["prompt"] != rows[2]["prompt"]  # groups of 2
    trainer.model.eval()
    rollout = trainer.make_rollout(rows)
    assert rollout.prompt_ids.shape[1] % 8 == 0 and rollout.completion_ids.shape[1] % 8 == 0
    assert trainer.num_generations == 2
    trainer.model.train()
    assert trainer.num_generations == 4
    assert GRPOConfig(output_dir="x", pad_to_multiple_of="none").pad_to_multiple_of is None
    assert GRPOConfig(output_dir="x").pad_to_multiple_of is None  # auto: 128 on Neuron only


def test_ppo_total_episodes_and_online_dpo_options(tmp_path):
    config = PPOConfig(output_dir="x", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       num_mini_batches=2, num_ppo_epochs=3, total_episodes=40, stop_token="eos")
    assert config.max_steps == 3 * 2 * 3  # ⌈40 / 16⌉ rollouts × 2 mini-batches × 3 epochs
    with pytest.raises(ValueError, match="stop_token"):
        PPOConfig(output_dir="x", stop_token="</s>")
    dpo = OnlineDPOConfig(output_dir="x", reward_model_path="some/rm", max_length=100)
    assert dpo.reward_model_name_or_path == "some/rm" and dpo.max_length == 100
    assert OnlineDPOConfig(output_dir="x").vllm_gpu_memory_utilization == 0.55  # TRL's Online DPO default


def test_online_dpo_max_length_cuts_prompt_columns(tmp_path):
    from posttrain.trainers.online_dpo import OnlineDPOTrainer

    trainer = OnlineDPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                               args=OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                                    max_completion_length=4, max_length=6, report_to="none"))
    from posttrain.rollout.types import Rollout

    rollout = Rollout(prompt_ids=torch.ones(2, 5, dtype=torch.long), prompt_mask=torch.ones(2, 5, dtype=torch.long),
                      completion_ids=torch.ones(2, 4, dtype=torch.long),
                      completion_mask=torch.ones(2, 4, dtype=torch.long), is_truncated=torch.zeros(2).bool())
    batch = trainer.rollout_tensors(rollout)
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].shape == (2, 6)  # 2 prompt + 4 completion


def test_streamed_dataset_trains_with_max_steps(tmp_path):
    stream = _prompts(16).to_iterable_dataset()
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=stream,
                          args=_args(tmp_path, max_steps=2, per_device_train_batch_size=8))
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch) == 8 and len({b["prompt"] for b in batch[:4]}) == 1 and batch[0]["prompt"] != batch[4]["prompt"]
    trainer.train()
    assert trainer.state.global_step == 2


def test_completions_sample_is_printed(tmp_path, capsys):
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                          args=_args(tmp_path, log_completions=True, num_completions_to_print=1,
                                     log_unique_prompts=True))
    trainer.train()
    out = capsys.readouterr().out
    assert "completions at step" in out
    from posttrain.reporting.rollouts import completions_sample

    rows = [{"prompt": "a", "x": 1}, {"prompt": "a", "x": 2}, {"prompt": "b", "x": 3}]
    assert completions_sample(rows, None, True) == [rows[0], rows[2]]  # log_unique_prompts: first of each prompt
    assert completions_sample(rows, 1, False) == [rows[0]]  # num_completions_to_print


def test_entropy_bonus_logs_policy_loss_and_streamed_eval(tmp_path):
    # loss = policy_loss − coef × mean entropy (GA 1, one micro-batch per step): (policy_loss − loss) / entropy = coef
    trainer = GRPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                          args=_args(tmp_path, entropy_coef=0.5, cast_lm_head_to_fp32=True))
    assert trainer._entropy_bonus_enabled
    assert trainer.model.get_output_embeddings().weight.dtype == torch.float32
    trainer.train()
    log = trainer.state.log_history[0]
    assert (log["policy_loss"] - log["loss"]) / log["entropy"] == pytest.approx(0.5, rel=1e-4)
    metrics = trainer.evaluate(eval_dataset=_prompts(5).to_iterable_dataset())  # 5 prompts: 1 batch + a partial one
    assert "eval_reward" in metrics
    keep = GRPOTrainer.get_off_policy_mask(torch.tensor([[-1.0], [1.0]]), torch.zeros(2, 2), torch.ones(2, 2),
                                           torch.ones(2, 2), 0.5)
    assert keep.tolist() == [[0.0], [1.0]]  # TRL's static name: KL 1 > 0.5 drops the negative-advantage row only


def test_generation_config_mirrors_the_options(tmp_path):
    from posttrain.trainers.online_dpo import OnlineDPOTrainer

    trainer = OnlineDPOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts(),
                               args=OnlineDPOConfig(output_dir=str(tmp_path), temperature=0.8, top_p=0.9, top_k=40,
                                                    repetition_penalty=1.2, max_new_tokens=64, report_to="none",
                                                    generation_kwargs={"do_sample": False}))
    config = trainer.generation_config
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty, config.max_new_tokens,
            config.do_sample) == (0.8, 0.9, 40, 1.2, 64, False)


def test_streamed_dataset_refuses_dispatched_batches(tmp_path):
    with pytest.raises(ValueError, match="Iterable datasets require `dispatch_batches=False`"):
        RLOOTrainer(MODEL, reward_funcs="length_reward", train_dataset=_prompts().to_iterable_dataset(),
                    args=RLOOConfig(output_dir=str(tmp_path), accelerator_config={"dispatch_batches": True},
                                    report_to="none"))


def test_one_reward_tokenizer_for_several_functions_is_refused():
    from posttrain.rewards.runner import RewardRunner

    def first(completions, **kwargs):
        return [0.0] * len(completions)

    def second(completions, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward_processing_classes \(1\) must match .* \(2\)"):
        RewardRunner([first, second], reward_processing_classes=object())  # TRL: a single one is a list of one
    assert RewardRunner([first], reward_processing_classes=object()).tokenizers == [None]  # functions take none


# ---- MoE router loss in the online trainers --------------------------------------------------------------------
@pytest.mark.parametrize("trainer_cls,config_cls", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_router_aux_loss_is_added_by_grpo_and_rloo(tmp_path, tiny_moe, trainer_cls, config_cls):
    """As TRL: on a Mixture-of-Experts policy the loss gains coef × the model's load-balancing loss of the policy's
    log-prob pass (whole rows, not the shared-prompt split), divided by the accumulation steps, in evaluation too;
    the rollout's own passes (sampling-policy and reference log-probs, beta > 0 and num_iterations 2) run without
    it."""
    model, tok = tiny_moe()
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
              max_completion_length=6, logging_steps=1, report_to="none", save_strategy="no", seed=0,
              disable_tqdm=True, router_aux_loss_coef=0.5, gradient_accumulation_steps=2, num_iterations=2,
              beta=0.1)
    trainer = trainer_cls(model, reward_funcs="length_reward", args=config_cls(**kw), train_dataset=_prompts(16),
                          processing_class=tok)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5 and model.config.output_router_logits
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with_aux = trainer.compute_loss(trainer.model, batch)
    saved, trainer._router_losses = trainer._router_losses, None
    plain = trainer.compute_loss(trainer.model, batch)
    trainer._router_losses = saved
    from posttrain.models.logprobs import positions_from_mask

    aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=positions_from_mask(batch["attention_mask"]), output_router_logits=True).aux_loss
    assert float((with_aux - plain).detach()) == pytest.approx(0.5 * float(aux.detach()) / 2, rel=1e-4)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "aux_loss" in logged and math.isfinite(logged["loss"])
    assert trainer.reference.model.config.output_router_logits is False  # a frozen copy computes no router loss
    metrics = trainer.evaluate(eval_dataset=_prompts(2))  # as TRL, the eval loss carries it too
    assert metrics["eval_aux_loss"] > 0


def test_router_aux_loss_zero_turns_it_off_online(tmp_path, tiny_moe):
    model, tok = tiny_moe()
    trainer = GRPOTrainer(model, reward_funcs="length_reward", args=_args(tmp_path, router_aux_loss_coef=0.0),
                          train_dataset=_prompts(), processing_class=tok)
    assert trainer.aux_loss_enabled is False and model.config.output_router_logits is False
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        GRPOTrainer(MODEL, reward_funcs="length_reward", args=_args(tmp_path, router_aux_loss_coef=0.1),
                    train_dataset=_prompts())


def test_moe_adapter_on_expert_parameters_uses_the_disabled_adapter_as_reference(tmp_path, tiny_moe):
    """TRL's regression (trl#5222): PEFT holds one adapter when LoRA targets parameters (MoE experts), so no frozen
    copy of it is made; the reference is the base model with the adapter disabled."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_moe()
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_parameters=targets))
    trainer = GRPOTrainer(model, reward_funcs="length_reward", args=_args(tmp_path, beta=0.1),
                          train_dataset=_prompts(), processing_class=tok)
    assert "ref" not in trainer.model.peft_config
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)


def test_get_high_entropy_mask_is_trls_quantile_selection():
    # TRL's method on an instance-less call (as TRL's own tests do): threshold = 1 - top_entropy_quantile, a quantile
    # of the masked entropies only. Masked values 0.1..1.0 (10 of them): the 0.5-quantile interpolates to 0.55, so
    # 0.6..1.0 stay; threshold 1.0 keeps only the largest masked value; nothing masked keeps nothing.
    from types import SimpleNamespace

    stub = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    kept = GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, 0.5)
    assert kept.tolist() == [[False] * 5 + [True], [True] * 4 + [False] * 2]
    assert GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, 1.0).nonzero().tolist() == [[1, 3]]
    assert GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, 0.0).tolist() == mask.bool().tolist()
    assert not GRPOTrainer.get_high_entropy_mask(stub, entropies, torch.zeros_like(mask), 0.5).any()
