"""The CUDA paths, run wherever a GPU is visible and skipped elsewhere: every trainer family trains on the GPU in its
default precision (bf16 where the GPU has it) with the model, the reference and the value model there; DPO's first
loss is ln 2 and GRPO's first KL is 0 there too; the shared-prefix forward and the chunked LM head give the plain
forward's log-probs on the GPU; a GPU run saves and resumes (CUDA RNG state included).

`POSTTRAIN_TEST_DEVICE=cpu` runs the same tests on the CPU: a check of the tests themselves on machines without a GPU
(CI has none), so the one GPU call a session may get is not spent on a broken test.
"""

import math
import os

import pytest
import torch

from posttrain.data.arith import load_builtin_dataset
from posttrain.hardware import default_bf16

DEVICE = os.environ.get("POSTTRAIN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (POSTTRAIN_TEST_DEVICE=cpu checks the "
                                                       "tests on a CPU)")
MODEL = "posttrain/tiny"


def unique_chars(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t)) / 10 for t in texts]


def _common(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                use_cpu=DEVICE == "cpu")
    base.update(kw)
    return base


def _on_device(module):
    return {p.device.type for p in module.parameters()} == {DEVICE}


def _trained(trainer):
    before = {n: p.detach().float().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = sum(not torch.equal(before[n], after[n].detach().float().cpu()) for n in before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert changed > 0.5 * len(before), f"{changed} of {len(before)} parameters changed"
    return trainer.state.log_history


def test_sft_trains_on_the_device_in_its_default_precision(tmp_path):
    from posttrain.configs.sft import SFTConfig
    from posttrain.trainers.sft import SFTTrainer

    args = SFTConfig(**_common(tmp_path, max_length=64))
    assert args.bf16 == (DEVICE == "cuda" and default_bf16())
    trainer = SFTTrainer(MODEL, args=args, train_dataset=load_builtin_dataset("posttrain/arith-sft",
                                                                                   split="train[:16]"))
    assert _on_device(trainer.model)
    _trained(trainer)


def test_dpo_first_loss_is_ln2_with_the_reference_on_the_device(tmp_path):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.trainers.dpo import DPOTrainer

    args = DPOConfig(**_common(tmp_path, max_length=64, learning_rate=1e-4))
    trainer = DPOTrainer(MODEL, args=args, train_dataset=load_builtin_dataset("posttrain/arith-pref",
                                                                               split="train[:16]"))
    assert _on_device(trainer.model)
    logs = _trained(trainer)
    assert _on_device(trainer.ref_model)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)  # policy = reference at step 1 (bf16 noise)


@pytest.mark.parametrize("family", ["kto", "reward", "orpo", "cpo"])
def test_offline_families_train_on_the_device(tmp_path, family):
    import posttrain as pt

    config, trainer_cls, data = {
        "kto": (pt.KTOConfig, pt.KTOTrainer, "posttrain/arith-kto"),
        "reward": (pt.RewardConfig, pt.RewardTrainer, "posttrain/arith-pref"),
        "orpo": (pt.ORPOConfig, pt.ORPOTrainer, "posttrain/arith-pref"),
        "cpo": (pt.CPOConfig, pt.CPOTrainer, "posttrain/arith-pref"),
    }[family]
    trainer = trainer_cls(MODEL, args=config(**_common(tmp_path, max_length=64)),
                          train_dataset=load_builtin_dataset(data, split="train[:16]"))
    assert _on_device(trainer.model)
    _trained(trainer)


def test_grpo_generates_and_trains_on_the_device_with_kl_zero_at_first(tmp_path):
    from posttrain.configs.grpo import GRPOConfig
    from posttrain.trainers.grpo import GRPOTrainer

    args = GRPOConfig(**_common(tmp_path, max_steps=2, num_generations=4, max_completion_length=12, beta=0.04,
                                num_iterations=2, log_completions=True))
    trainer = GRPOTrainer(MODEL, reward_funcs=unique_chars, args=args,
                          train_dataset=load_builtin_dataset("posttrain/arith-prompts", "conversational",
                                                             split="train[:8]"))
    assert _on_device(trainer.model)
    logs = _trained(trainer)
    assert _on_device(trainer.ref_model)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert logs[0]["completions/mean_length"] > 0


@pytest.mark.parametrize("family", ["rloo", "online_dpo", "ppo"])
def test_online_families_train_on_the_device(tmp_path, family):
    import posttrain as pt

    prompts = load_builtin_dataset("posttrain/arith-prompts", split="train[:8]")
    if family == "rloo":
        args = pt.RLOOConfig(**_common(tmp_path, max_steps=2, num_generations=4, max_completion_length=12, beta=0.05))
        trainer = pt.RLOOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=prompts)
    elif family == "online_dpo":
        args = pt.OnlineDPOConfig(**_common(tmp_path, max_steps=2, max_completion_length=12))
        trainer = pt.OnlineDPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=prompts)
    else:
        args = pt.PPOConfig(**_common(tmp_path, max_steps=2, num_mini_batches=2, max_completion_length=10))
        trainer = pt.PPOTrainer(MODEL, reward_funcs=unique_chars, args=args, train_dataset=prompts)
    assert _on_device(trainer.model)
    _trained(trainer)
    if family == "ppo":
        assert _on_device(trainer.model.value_model)


@pytest.mark.parametrize("path", ["shared_prefix", "chunked_head"])
def test_fast_logprob_paths_match_the_plain_forward_on_the_device(path, monkeypatch):
    from posttrain.models import loading, logprobs
    from posttrain.models.logprobs import completion_logps

    torch.manual_seed(0)
    model = loading.load_pretrained_model(MODEL).to(DEVICE, torch.float32)
    prompt_len, completion_len, group = 10, 8, 3
    rows = 2 * group
    prompts = [torch.randint(3, 4000, (n,)) for n in (6, 10)]
    ids = torch.zeros(rows, prompt_len + completion_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(rows):
        prompt, n = prompts[i // group], 1 + i % completion_len
        ids[i, prompt_len - len(prompt):prompt_len], mask[i, prompt_len - len(prompt):prompt_len] = prompt, 1
        ids[i, prompt_len:prompt_len + n], mask[i, prompt_len:prompt_len + n] = torch.randint(3, 4000, (n,)), 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_len] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
             "labels": labels}
    batch = {k: v.to(DEVICE) for k, v in batch.items()}

    def run(**kw):
        model.zero_grad()
        out = completion_logps(model, batch, temperature=0.7, with_entropy=True, **kw)
        out["logps"].sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out["logps"].detach(), out["entropy"].detach(), grads

    plain = run(shared_prefix=0)
    if path == "shared_prefix":
        fast = run(shared_prefix=prompt_len)  # the prompt columns, shared by each group of rows
    else:
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_ROWS", 4)  # 27 trained rows: 7 chunks
        fast = run(shared_prefix=0, chunked_lm_head=True)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_device_run_saves_and_resumes(tmp_path):
    from posttrain.configs.sft import SFTConfig
    from posttrain.trainers.sft import SFTTrainer

    data = load_builtin_dataset("posttrain/arith-sft", split="train[:32]")

    def trainer(**kw):
        return SFTTrainer(MODEL, args=SFTConfig(**_common(tmp_path, max_steps=4, max_length=64, save_steps=2,
                                                          save_strategy="steps", **kw)), train_dataset=data)

    trainer().train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "rng_state.pth").exists()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert _on_device(resumed.model)
