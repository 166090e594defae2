"""PPOTrainer on the built-in tiny model: trains policy and critic with a reward function or a reward model (PEFT,
k3, whitened rewards, missing-EOS penalty), logs TRL's PPO metrics, KL 0 on the first rollout, saves a policy that
AutoModelForCausalLM reloads plus output_dir/value_model; the guide's legacy call form; GAE and whitening of a
real rollout against a plain loop; config validation and legacy names."""

import math
import warnings

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

from posttrain.configs.ppo import PPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path
from posttrain.models.value import token_values
from posttrain.trainers.ppo import PPOTrainer

MODEL = "posttrain/tiny"
PPO_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
               "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var",
               "val/num_eos_tokens", "episode", "reward", "completions/mean_length", "timing/generate",
               "timing/values", "num_tokens")


def unique_chars(completions, **kwargs):
    return [float(len(set(c))) / 10 for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_mini_batches=2,
                num_ppo_epochs=1, max_completion_length=10, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", seed=0, disable_tqdm=True)
    base.update(kw)
    return PPOConfig(**base)


def _prompts(n=8):
    return load_builtin_dataset("posttrain/arith-prompts", split=f"train[:{n}]")


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return sum(not torch.equal(before[n], p) for n, p in module.named_parameters()) / len(before)


def test_trains_policy_and_critic_and_saves(tmp_path):
    trainer = PPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, max_steps=4, num_ppo_epochs=2),
                         train_dataset=_prompts())
    policy, critic = trainer.model.policy, trainer.model.value_model
    assert torch.equal(critic.model.embed_tokens.weight, policy.model.embed_tokens.weight)  # the policy's backbone
    policy_before, critic_before = _params(policy), _params(critic)
    trainer.train()
    first = trainer.state.log_history[0]
    for key in PPO_METRICS:
        assert key in first, key
    assert "reward_std" not in first  # one completion per prompt: no group statistics
    # the first rollout: policy = reference, and the first mini-batch trains on unchanged weights
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5) and first["policy/approxkl_avg"] < 1e-8
    assert first["episode"] == 8
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 4 and all(math.isfinite(log["loss"]) and math.isfinite(log["loss/value_avg"])
                                   for log in steps)
    assert _changed(policy_before, policy) > 0.9 and _changed(critic_before, critic) > 0.9
    trainer.save_model()
    out = tmp_path / "out"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(p, reloaded.state_dict()[n]) for n, p in policy.state_dict().items())
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert torch.equal(value.score.weight, critic.score.weight)
    assert AutoTokenizer.from_pretrained(out).pad_token is not None


def test_reward_model_peft_k3_whitened_rewards(tmp_path):
    from peft import LoraConfig

    reward_model = AutoModelForSequenceClassification.from_pretrained(builtin_model_path(MODEL), num_labels=1)
    args = _args(tmp_path, kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0)
    trainer = PPOTrainer(MODEL, reward_model=reward_model, args=args, train_dataset=_prompts(),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None  # the reference is the policy with its adapters disabled
    critic_before = _params(trainer.model.value_model)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.policy.named_parameters() if p.requires_grad}
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(first["objective/scores"]) and any(k.startswith("rewards/") for k in first)
    assert _changed(critic_before, trainer.model.value_model) > 0.9
    policy = dict(trainer.model.policy.named_parameters())
    assert lora_before and all(not torch.equal(p, policy[n]) for n, p in lora_before.items() if "lora_B" in n)


def test_guide_legacy_form(tmp_path):
    with pytest.warns(FutureWarning) as record:
        config = PPOConfig(model_name=MODEL, learning_rate=1.41e-5, batch_size=8, mini_batch_size=4, ppo_epochs=1,
                           output_dir=str(tmp_path / "out"), max_steps=2, max_completion_length=8,
                           report_to="none", save_strategy="no")
    messages = [str(w.message) for w in record]
    for modern in ("PPOTrainer(model=", "use num_ppo_epochs", "use per_device_train_batch_size",
                   "use num_mini_batches"):
        assert sum(modern in m for m in messages) == 1, modern
    assert (config.per_device_train_batch_size, config.num_mini_batches, config.num_ppo_epochs) == (4, 2, 1)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_path(MODEL))
    ref_model = AutoModelForCausalLM.from_pretrained(builtin_model_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path(MODEL))
    with pytest.warns(FutureWarning) as record:
        trainer = PPOTrainer(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer,
                             dataset=_prompts(), data_collator=lambda rows: rows, reward_funcs=unique_chars)
    messages = [str(w.message) for w in record]
    for modern in ("use PPOTrainer(args=", "use PPOTrainer(train_dataset=", "processing_class=",
                   "data_collator is ignored"):
        assert sum(modern in m for m in messages) == 1, modern
    assert trainer.ref_model is ref_model and trainer.model.policy is model and trainer.args is config
    trainer.train()
    assert trainer.state.global_step == 2
    # TRL's PPO data forms: prompts tokenised up front (`input_ids`), or a `query` text column
    ids = tokenizer("12 + 7 =")["input_ids"]
    tokenised, _ = trainer.prepare_datasets(datasets.Dataset.from_dict({"input_ids": [ids]}), None, tokenizer, config)
    queries, _ = trainer.prepare_datasets(datasets.Dataset.from_dict({"query": ["3 + 4 ="]}), None, tokenizer, config)
    assert tokenised[0]["prompt"] == "12 + 7 =" and queries[0]["prompt"] == "3 + 4 ="


def test_checkpoint_resume_and_evaluate(tmp_path):
    def make(max_steps):
        args = _args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, eval_strategy="steps",
                     eval_steps=2, per_device_eval_batch_size=4, max_completion_length=6)
        return PPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts(),
                          eval_dataset=_prompts(12).select(range(8, 12)))

    trainer = make(2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "value_model" / "model.safetensors").exists()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and "eval_objective/scores" in evals[0] and math.isfinite(evals[0]["eval_loss"])
    resumed = make(4)
    resumed._load_from_checkpoint(str(checkpoint))
    for trained, loaded in ((trainer.model.policy, resumed.model.policy),
                            (trainer.model.value_model, resumed.model.value_model)):
        assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), loaded.parameters()))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4


def _plain_gae(rewards, values, length, gamma, lam):
    """Right to left over the first `length` tokens; V and A beyond the last token are 0."""
    advantages, next_value, next_advantage = [0.0] * length, 0.0, 0.0
    for t in reversed(range(length)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t], next_value = next_advantage, values[t]
    return advantages


def test_gae_and_whitening_of_a_rollout(tmp_path):
    args = _args(tmp_path, gamma=0.9, lam=0.8, kl_coef=0.1, missing_eos_penalty=2.0, max_completion_length=6,
                 value_model_name_or_path=MODEL)
    trainer = PPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts())
    with torch.no_grad():  # move the policy away from the reference so the KL term is not 0
        for p in trainer.model.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    trainer.model.train()
    rows = next(iter(trainer.get_train_dataloader()))
    rollout = trainer.make_rollout(rows)
    batch = trainer.ppo_targets(trainer.rollout_tensors(rollout), rollout.scores, rollout.is_truncated)
    mask = batch["completion_mask"].bool()
    prompt_len = batch["input_ids"].shape[1] - mask.shape[1]
    # independent recomputation: reward-function score − EOS penalty, k1 KL to the reference, critic values
    completions = [trainer.processing_class.decode(ids[m], skip_special_tokens=True)
                   for ids, m in zip(batch["input_ids"][:, prompt_len:], mask)]
    penalty = 2.0 * rollout.is_truncated.float()
    assert torch.allclose(batch["scores"], torch.tensor(unique_chars(completions)) - penalty)
    ref_logps = trainer._batched_logps(trainer.ref_model, batch)
    kl = batch["old_logps"] - ref_logps
    assert (kl * mask).abs().sum() > 0
    with torch.no_grad():
        values = token_values(trainer.model.value_model, batch["input_ids"], batch["attention_mask"],
                              (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))[:, prompt_len - 1:-1]
    assert torch.allclose(batch["old_values"][mask], values[mask], atol=1e-5)
    raw, returns = torch.zeros_like(values), torch.zeros_like(values)
    for i in range(values.shape[0]):
        length = int(mask[i].sum())
        rewards = (-0.1 * kl[i, :length]).tolist()
        rewards[-1] += float(batch["scores"][i])
        adv = _plain_gae(rewards, values[i, :length].tolist(), length, 0.9, 0.8)
        raw[i, :length] = torch.tensor(adv)
        returns[i, :length] = raw[i, :length] + values[i, :length]
    assert torch.allclose(batch["returns"], returns, atol=1e-4)
    flat = raw[mask]
    whitened = (raw - flat.mean()) / torch.sqrt(flat.var() + 1e-8) * mask
    assert torch.allclose(batch["advantages"], whitened, atol=1e-4)
    assert batch["advantages"][mask].mean().abs() < 1e-5 and (batch["advantages"][~mask] == 0).all()
    # each PPO epoch reshuffles the rollout into num_mini_batches × GA micro-batches with the mini-batch's count
    steps = trainer.with_item_counts(trainer.training_batches(rollout))
    assert len(steps) == 2 * args.num_ppo_epochs  # num_mini_batches optimizer steps per epoch
    parts = [part for step in steps[:2] for part in step]
    assert len(parts) == 2 and all(p["input_ids"].shape[0] == 4 for p in parts)
    assert sum(float(p["completion_mask"].sum()) for p in parts) == float(mask.sum())
    assert all(float(p["num_items"]["token"]) == float(p["completion_mask"].sum()) for p in parts)


def test_config_options_and_legacy_names():
    config = PPOConfig(output_dir="x", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       num_mini_batches=3, num_ppo_epochs=2)
    assert config.num_generations == 1 and config.learning_rate == 3e-6 and config.disable_dropout
    assert (config.generation_batch_size, config.steps_per_generation, config.num_iterations) == (12, 6, 2)
    flat = config.to_flat_dict()
    assert flat["num_ppo_epochs"] == 2 and "loss_type" not in flat and "beta" not in flat and "ppo_epochs" not in flat
    with pytest.raises(TypeError):
        PPOConfig(output_dir="x", loss_type="grpo")  # GRPO's loss options do not apply
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(output_dir="x", kl_estimator="k2")
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PPOConfig(output_dir="x", batch_size=10, mini_batch_size=4)
    with pytest.warns(FutureWarning, match="max_completion_length"):
        assert PPOConfig(output_dir="x", response_length=7).max_completion_length == 7
    (parsed,) = HfArgumentParser(PPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--num_ppo_epochs", "3", "--kl_estimator", "k3", "--missing_eos_penalty", "1.0"])
    assert (parsed.num_ppo_epochs, parsed.kl_estimator, parsed.missing_eos_penalty) == (3, "k3", 1.0)
    # without reward functions only the older loop API runs (tests/test_ppo_loop.py: train() then asks for them)
    assert PPOTrainer(MODEL, args=PPOConfig(output_dir="x"), train_dataset=_prompts()).reward_runner is None


def test_adaptive_kl_controller_moves_the_coefficient(tmp_path):
    """adaptive_kl: kl_coef follows each rollout's KL (Ziegler et al. 2019); the legacy names map onto it."""
    args = _args(tmp_path, max_steps=4, num_mini_batches=1, num_ppo_epochs=2, adaptive_kl=True, kl_coef=0.2,
                 kl_target=1e-6, kl_horizon=100.0)
    trainer = PPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts())
    trainer.train()
    logged = [(h["objective/kl_coef"], h["objective/kl"]) for h in trainer.state.log_history if "objective/kl" in h]
    assert len(logged) == 2 and logged[0] == (0.2, 0.0)  # the first rollout: policy = reference
    # after each rollout of 4: β ← β·(1 + clip(KL/target − 1, ±0.2)·4/100), with the KL that rollout logged
    beta = 0.2
    for coef, kl in logged:
        assert coef == pytest.approx(beta)
        beta *= 1.0 + min(max(kl / 1e-6 - 1.0, -0.2), 0.2) * 4 / 100
    assert trainer.kl_controller.value == pytest.approx(beta) and beta != 0.2
    with pytest.warns(FutureWarning, match="adaptive_kl"):
        legacy = PPOConfig(output_dir="x", adap_kl_ctrl=True, init_kl_coef=0.3, target=2.0, horizon=500)
    assert (legacy.adaptive_kl, legacy.kl_coef, legacy.kl_target, legacy.kl_horizon) == (True, 0.3, 2.0, 500)
    with pytest.raises(ValueError, match="kl_target"):
        PPOConfig(output_dir="x", adaptive_kl=True, kl_target=0.0)
