"""GRPOTrainer on the built-in tiny model: every loss type trains and logs TRL's metrics; reference and KL when
beta > 0; reuse with old log-probs; completions table; the guide's call forms; reward errors name the function."""

import json
import math
import warnings

import datasets
import pytest
import torch

from posttrain.configs.grpo import GRPOConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.trainers.grpo import GRPOTrainer

MODEL = "posttrain/tiny"


def _text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def unique_chars(completions, **kwargs):
    return [float(len(set(_text(c)))) for c in completions]


def short(completions, **kwargs):
    return [-len(c) / 100 for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=12, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def _prompts(config=None, n=8):
    return load_builtin_dataset("posttrain/arith-prompts", config, split=f"train[:{n}]")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo"])
def test_every_loss_type_trains(tmp_path, loss_type):
    trainer = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, loss_type=loss_type),
                          train_dataset=_prompts())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "rewards/unique_chars/mean", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "frac_reward_zero_std", "timing/generate", "num_tokens"):
        assert key in logs, key
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed > 0.9 * len(before)


def test_gspo_kl_and_reuse(tmp_path):
    args = _args(tmp_path, importance_sampling_level="sequence", beta=0.04, num_iterations=2, max_steps=2,
                 epsilon_high=0.28)
    trainer = GRPOTrainer(MODEL, reward_funcs=[unique_chars, short], args=args, train_dataset=_prompts())
    assert trainer.ref_model is not None
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step: policy = reference
    assert "timing/old_logps" in logs and "timing/reference" in logs and "rewards/short/mean" in logs


def test_conversational_prompts_and_builtin_reward(tmp_path):
    trainer = GRPOTrainer(MODEL, reward_funcs=["accuracy_reward", unique_chars],
                          args=_args(tmp_path, log_completions=True), train_dataset=_prompts("conversational"))
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    assert rows and {"prompt", "completion", "accuracy_reward", "unique_chars", "advantage"} <= set(rows[0])


def test_reward_function_error_names_it(tmp_path):
    def broken(completions, **kwargs):
        raise ZeroDivisionError("boom")

    trainer = GRPOTrainer(MODEL, reward_funcs=broken, args=_args(tmp_path), train_dataset=_prompts())
    with pytest.raises(Exception, match="broken"):
        trainer.train()


def test_guide_call_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = load_builtin_dataset("posttrain/arith-sft", split="train[:2]")  # prompt + completion, like tldr

    def reward_unique_chars(completions, **kwargs):
        return [len(set(completion)) for completion in completions]

    with warnings.catch_warnings(record=True):
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_unique_chars,
            train_dataset=dataset,
            num_train_epochs=1,
            per_device_train_batch_size=2,
            learning_rate=1e-6,
            max_completion_length=8,
        )
    assert trainer.args.num_generations == 8 and trainer.args.generation_batch_size % 8 == 0
    trainer.train()

    def reward_length(completions, **kwargs):
        return [min(len(c) / 100, 1.0) for c in completions]

    with warnings.catch_warnings(record=True):
        trainer = GRPOTrainer(model=MODEL, reward_funcs=[reward_unique_chars, reward_length],
                              reward_weights=[0.4, 0.6], train_dataset=dataset, max_steps=1,
                              max_completion_length=8)
    trainer.train()
    assert trainer.reward_runner.weights == [0.4, 0.6]


def test_bad_values(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOConfig(output_dir="x", num_generations=1)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        GRPOConfig(output_dir="x", epsilon=0)
    with pytest.raises(ValueError, match="^No reward source provided: GRPOTrainer needs reward_funcs"):  # TRL's words
        GRPOTrainer(MODEL, args=_args(tmp_path), train_dataset=_prompts())
    with pytest.raises(ValueError, match="'prompt'"):
        GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path),
                    train_dataset=datasets.Dataset.from_list([{"question": "x"}] * 4))


def test_evaluate_generates_on_eval_prompts(tmp_path):
    trainer = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, per_device_eval_batch_size=8),
                          train_dataset=_prompts(), eval_dataset=_prompts(n=4))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_reward" in metrics
    assert "eval_completions/mean_length" in metrics


def test_saved_config_reloads(tmp_path):
    import yaml

    from posttrain.cli import parse_command_args

    trainer = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path), train_dataset=_prompts())
    path = trainer.save_run_config()
    saved = yaml.safe_load(open(path))
    assert saved["generation_batch_size"] and saved["steps_per_generation"]
    _, _, args = parse_command_args("grpo", ["--config", path])
    assert args.generation_batch_size == trainer.args.generation_batch_size


class _VaryingLengths(GRPOTrainer):
    """Completions cut to 1, 3, 5, … tokens by row, so micro-batches hold different numbers of tokens."""

    def sample(self, rows):
        rollout = super().sample(rows)
        keep = torch.tensor([1 + 2 * (i % 5) for i in range(len(rows))])
        cut = torch.arange(rollout.completion_mask.shape[1])[None, :] < keep[:, None]
        rollout.completion_mask = rollout.completion_mask * cut.to(rollout.completion_mask.dtype)
        rollout.completion_ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0,
                                                                    self.processing_class.pad_token_id)
        return rollout


def _one_sgd_step(tmp_path, name, loss_type, per_device, accumulation, normalization="global", **options):
    """The policy after one plain-SGD step (the update is then the gradient itself) on the same generation batch of
    8 completions (2 prompts × 4), split into `accumulation` micro-batches of `per_device` rows."""
    args = _args(tmp_path / name, loss_type=loss_type, max_steps=1, per_device_train_batch_size=per_device,
                 gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                 max_completion_length=10, loss_normalization=normalization, **options)
    trainer = _VaryingLengths(MODEL, reward_funcs=unique_chars, args=args, train_dataset=_prompts(n=2))
    assert trainer.args.generation_batch_size == 8
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo"])
def test_loss_is_invariant_to_accumulation(tmp_path, loss_type):
    """1 micro-batch of 8 = 4 accumulation steps of 2, for every loss type: the same rollout, the same update
    (the reduction counts tokens/sequences over the whole optimizer step; tests/test_distributed.py covers
    processes, tests/test_losses_policy.py the pure 1×4 = 2×2 = 4×1 identity)."""
    whole = _one_sgd_step(tmp_path, "whole", loss_type, 8, 1)
    split = _one_sgd_step(tmp_path, "split", loss_type, 2, 4)
    worst = max(float((whole[n] - split[n]).abs().max()) for n in whole)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("loss_type,normalization", [("dapo", "global"), ("grpo", "global"), ("bnpo", "trl"),
                                                     ("dr_grpo", "global"), ("cispo", "global"), ("sapo", "trl"),
                                                     ("luspo", "global"), ("vespo", "global")])
def test_backward_in_token_slices_gives_the_same_update(tmp_path, loss_type, normalization, monkeypatch):
    """max_tokens_per_backward: the micro-batch of 8 goes through forward/backward in row slices (here 1 row, then
    ~3 rows per slice), and the update is the one of the whole micro-batch."""
    from posttrain.trainers import online_batches

    sizes = []
    real = online_batches.token_slices
    monkeypatch.setattr(online_batches, "token_slices", lambda b, n: sizes.append(len(real(b, n))) or real(b, n))
    whole = _one_sgd_step(tmp_path, "whole", loss_type, 8, 1, normalization)
    for budget in (1, 3 * 40):
        sliced = _one_sgd_step(tmp_path, f"sliced-{budget}", loss_type, 8, 1, normalization,
                               max_tokens_per_backward=budget)
        worst = max(float((whole[n] - sliced[n]).abs().max()) for n in whole)
        assert worst < 1e-5, (budget, worst)
    assert sizes[0] == 8 and 1 < sizes[1] < 8, sizes


def test_max_tokens_per_backward_refusals():
    with pytest.raises(ValueError, match="max_tokens_per_backward must be a positive"):
        GRPOConfig(output_dir="/tmp/x", max_tokens_per_backward=0)
    with pytest.raises(ValueError, match="max_tokens_per_backward must be a positive"):
        GRPOConfig(output_dir="/tmp/x", max_tokens_per_backward=True)
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 or an entropy bonus"):
        GRPOConfig(output_dir="/tmp/x", max_tokens_per_backward=512, top_entropy_quantile=0.2)
    with pytest.raises(TypeError, match="max_tokens_per_backward"):  # a sibling that does not slice refuses it
        from posttrain import OnlineDPOConfig

        OnlineDPOConfig(output_dir="/tmp/x", max_tokens_per_backward=512)


def test_trl_normalisation_switch_takes_effect(tmp_path):
    """loss_normalization='trl' reproduces TRL's per-micro-batch bnpo: under accumulation the update differs
    from the global token mean; without accumulation both are the same."""
    split_trl = _one_sgd_step(tmp_path, "trl", "bnpo", 2, 4, "trl")
    split = _one_sgd_step(tmp_path, "global", "bnpo", 2, 4)
    assert max(float((split_trl[n] - split[n]).abs().max()) for n in split) > 1e-5
    whole_trl = _one_sgd_step(tmp_path, "whole-trl", "bnpo", 8, 1, "trl")
    whole = _one_sgd_step(tmp_path, "whole-global", "bnpo", 8, 1)
    assert max(float((whole_trl[n] - whole[n]).abs().max()) for n in whole) < 1e-6


def test_bf16_rollout_runs_in_one_autocast_block(tmp_path, monkeypatch):
    """With mixed precision the whole rollout runs inside one autocast block (the policy's forward autocasts every
    call; the outer block keeps the weights' bf16 casts for all decode steps instead of casting once per token)."""
    import posttrain.trainers.online_sampling as sampling

    seen = []

    def recording_generate(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_generate(*args, **kwargs)

    real_generate = sampling.generate
    monkeypatch.setattr(sampling, "generate", recording_generate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns that it is slow
        trainer = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, bf16=True, max_steps=1),
                              train_dataset=_prompts())
    trainer.train()
    assert seen and all(seen)
    seen.clear()
    fp32 = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=_args(tmp_path, max_steps=1), train_dataset=_prompts())
    fp32.train()
    assert seen and not any(seen)  # no mixed precision: no autocast
