"""TRL's older PPO loop on the built-in tiny model, as the guides write it: `PPOTrainer(config=..., model=...,
ref_model=..., tokenizer=..., dataset=..., data_collator=...)` without reward functions, then `dataloader` →
`generate` → the user's scores → `step` → `log_stats`. Two steps train the policy and the critic, return finite
TRL-named stats and log through the trainer; one deprecation message names the modern form; `generate` returns
responses with or without the prompt; bad inputs to `step` fail in one line."""

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.configs.ppo import PPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.models.builtin import builtin_model_path
from posttrain.trainers.ppo import PPOTrainer

MODEL = "posttrain/tiny"
STATS = ("objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_scores", "ppo/std_scores",
         "ppo/mean_non_score_reward", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy",
         "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
         "ppo/returns/mean", "ppo/returns/var", "ppo/learning_rate", "tokens/queries_len_mean",
         "tokens/responses_len_mean", "time/ppo/total")


def _guide_trainer(tmp_path, **config):
    """The guides' construction: config=, model=, ref_model=, tokenizer=, dataset=, data_collator=."""
    options = dict(model_name=MODEL, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=2,
                   output_dir=str(tmp_path / "out"), report_to="none", seed=0, log_completions=True)
    options.update(config)
    path = builtin_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PPOTrainer(config=PPOConfig(**options), model=AutoModelForCausalLM.from_pretrained(path),
                          ref_model=AutoModelForCausalLM.from_pretrained(path), tokenizer=tokenizer,
                          dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"),
                          data_collator=lambda rows: {key: [row[key] for row in rows] for key in rows[0]})


def _score(texts):
    return [float(len(set(t))) / 10 for t in texts]


def test_guide_loop_two_steps(tmp_path):
    trainer = _guide_trainer(tmp_path)
    tokenizer = trainer.processing_class
    policy, critic = trainer.model.policy, trainer.model.value_model
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tokenizer.eos_token_id, "max_new_tokens": 8}
    all_stats = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch, batch in enumerate(trainer.dataloader):
            query_tensors = batch["input_ids"]
            assert len(query_tensors) == 4 and all(q.dim() == 1 and q.dtype == torch.long for q in query_tensors)
            response_tensors = trainer.generate(query_tensors, return_prompt=False, **generation_kwargs)
            batch["response"] = tokenizer.batch_decode(response_tensors)
            rewards = [torch.tensor(x) for x in _score(batch["response"])]
            stats = trainer.step(query_tensors, response_tensors, rewards)
            trainer.log_stats(stats, batch, rewards)
            all_stats.append(stats)
            if epoch == 1:
                break
    loop_warnings = [str(w.message) for w in record if issubclass(w.category, FutureWarning)
                     and "loop API" in str(w.message)]
    assert len(loop_warnings) == 1 and "reward_funcs=" in loop_warnings[0] and ".train()" in loop_warnings[0]
    assert len(all_stats) == 2
    for stats in all_stats:
        for key in STATS:
            assert key in stats and math.isfinite(stats[key]), key
    assert all_stats[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy
    assert all_stats[0]["tokens/queries_len_mean"] > 0 and 0 < all_stats[0]["tokens/responses_len_mean"] <= 8
    assert trainer.state.global_step == 2 * 2 * 2  # steps × ppo_epochs × mini-batches (batch_size / mini_batch_size)
    changed = sum(not torch.equal(policy_before[n], p) for n, p in policy.named_parameters()) / len(policy_before)
    assert changed > 0.9
    assert any(not torch.equal(critic_before[n], p) for n, p in critic.named_parameters())
    logged = [log for log in trainer.state.log_history if "ppo/loss/policy" in log]
    assert len(logged) == 2 and all("env/reward_mean" in log and "loss/value_avg" in log for log in logged)
    assert (tmp_path / "out" / "completions.jsonl").read_text().count("\n") == 8  # log_completions: 2 × 4 rows


def test_generate_with_and_without_the_prompt(tmp_path):
    trainer = _guide_trainer(tmp_path)
    queries = next(iter(trainer.dataloader))["input_ids"][:2]
    greedy = {"do_sample": False, "max_new_tokens": 6}
    full = trainer.generate(queries, **greedy)
    responses = trainer.generate(queries, return_prompt=False, **greedy)
    for query, whole, response in zip(queries, full, responses):
        assert 1 <= len(response) <= 6 and torch.equal(whole, torch.cat([query, response]))
    single = trainer.generate(queries[0], return_prompt=False, **greedy)
    assert single.shape == (1, len(responses[0])) and torch.equal(single[0], responses[0])


def test_step_checks_its_inputs(tmp_path):
    trainer = _guide_trainer(tmp_path)
    q, r = torch.tensor([5, 6, 7]), torch.tensor([8, 9])
    cases = [(([q, q], [r], [1.0, 2.0]), "got 2 queries, 1 responses and 2 scores; give one response and one score"),
             (([q, q], [r, r], [1.0]), "got 2 queries, 2 responses and 1 scores"),
             (([q, q], [r, r], [torch.tensor([1.0, 2.0]), 1.0]), r"scores\[0\] must be a scalar"),
             (([q, q[None]], [r, r], [1.0, 2.0]), r"queries\[1\] must be a 1-D tensor of token ids"),
             (([q, q], [r, r.float()], [1.0, 2.0]), r"responses\[1\] must be a 1-D tensor of token ids"),
             (([q, q], [r, r], [1.0, float("nan")]), r"scores\[1\] is nan"),
             (([q], [r], [1.0]), "got 1 queries but num_mini_batches is 2"),
             ((q, r, [1.0]), "takes queries as a list")]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            trainer.step(*arguments)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"train\(\) needs reward_funcs"):
        trainer.train()
