"""Distillation: the generalized JSD loss (hand-derived values at β = 0, 0.5, 1, its gradient, temperature, the
teacher top-k approximation), the teacher's columns and the masked per-token terms, DistillationTrainer and
GKDTrainer on tiny models (training, teacher frozen and kept out of checkpoints, resume, GKD's batch sources, data
forms), the CLI, and one-line errors for bad input."""

import math
import os

import pytest
import torch
from datasets import Dataset

from posttrain.configs.distillation import DistillationConfig, GKDConfig
from posttrain.data.arith import load_builtin_dataset
from posttrain.errors import UserError
from posttrain.losses.distill import divergence_from_logps, generalized_jsd, teacher_top_k, top_k_generalized_jsd
from posttrain.models import teacher as teachers
from posttrain.models.logprobs import output_head
from posttrain.trainers.distillation import DistillationTrainer, GKDTrainer

STUDENT, TEACHER = "posttrain/tiny", "posttrain/tiny-4m"  # same tokenizer (4,096 tokens)

# T = [0.8, 0.1, 0.1], S = [0.4, 0.4, 0.2]
T_PROBS = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64)
S_PROBS = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
LN2 = math.log(2)


def test_forward_kl_at_beta_0():
    """KL(T ‖ S) = 0.8 ln(0.8/0.4) + 0.1 ln(0.1/0.4) + 0.1 ln(0.1/0.2) = 0.8 ln2 − 0.2 ln2 − 0.1 ln2 = 0.5 ln2."""
    value = generalized_jsd(S_PROBS.log(), T_PROBS.log(), beta=0.0)
    assert value.item() == pytest.approx(0.5 * LN2, rel=1e-6)


def test_reverse_kl_at_beta_1():
    """KL(S ‖ T) = 0.4 ln(0.4/0.8) + 0.4 ln(0.4/0.1) + 0.2 ln(0.2/0.1) = −0.4 ln2 + 0.8 ln2 + 0.2 ln2 = 0.6 ln2."""
    value = generalized_jsd(S_PROBS.log(), T_PROBS.log(), beta=1.0)
    assert value.item() == pytest.approx(0.6 * LN2, rel=1e-6)


def test_jsd_at_beta_half():
    """M = (T + S)/2 = [0.6, 0.25, 0.15]; JSD = ½ KL(T ‖ M) + ½ KL(S ‖ M), each written out."""
    kl_t = 0.8 * math.log(0.8 / 0.6) + 0.1 * math.log(0.1 / 0.25) + 0.1 * math.log(0.1 / 0.15)
    kl_s = 0.4 * math.log(0.4 / 0.6) + 0.4 * math.log(0.4 / 0.25) + 0.2 * math.log(0.2 / 0.15)
    value = generalized_jsd(S_PROBS.log(), T_PROBS.log(), beta=0.5)
    assert value.item() == pytest.approx(0.5 * kl_t + 0.5 * kl_s, rel=1e-6)
    # symmetric at β = ½ and bounded by ln 2
    assert generalized_jsd(T_PROBS.log(), S_PROBS.log(), beta=0.5).item() == pytest.approx(value.item(), rel=1e-6)
    assert value.item() < LN2


def test_generalized_jsd_at_beta_0_3():
    """M = 0.3 T + 0.7 S = [0.52, 0.31, 0.17]; 0.3 KL(T ‖ M) + 0.7 KL(S ‖ M)."""
    m = [0.3 * t + 0.7 * s for t, s in zip([0.8, 0.1, 0.1], [0.4, 0.4, 0.2])]
    kl_t = sum(t * math.log(t / mi) for t, mi in zip([0.8, 0.1, 0.1], m))
    kl_s = sum(s * math.log(s / mi) for s, mi in zip([0.4, 0.4, 0.2], m))
    value = generalized_jsd(S_PROBS.log(), T_PROBS.log(), beta=0.3)
    assert value.item() == pytest.approx(0.3 * kl_t + 0.7 * kl_s, rel=1e-6)


def test_equal_distributions_and_zero_probabilities():
    logits = torch.randn(4, 7)
    for beta in (0.0, 0.5, 1.0):
        assert generalized_jsd(logits, logits, beta).abs().max().item() < 1e-6
    # a zero-probability token of the teacher contributes nothing to KL(T ‖ S) and stays finite
    t = torch.tensor([[0.5, 0.5, 0.0]]).log()
    s = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert divergence_from_logps(s, t, 0.0).item() == pytest.approx(LN2, rel=1e-6)


def test_gradient_of_forward_kl_is_student_minus_teacher_probs():
    """d KL(T ‖ softmax(z)) / dz = softmax(z) − T (and the teacher's logits get no gradient)."""
    z = torch.randn(3, 5, requires_grad=True)
    teacher_logits = torch.randn(3, 5, requires_grad=True)
    generalized_jsd(z, teacher_logits, beta=0.0).sum().backward()
    expected = torch.softmax(z.detach(), -1) - torch.softmax(teacher_logits.detach(), -1)
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-6)
    assert teacher_logits.grad is None


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_closed_form_gradient_equals_autograd(beta, temperature):
    """The closed-form gradient of `jsd_terms_and_grad` (what the loss's backward uses) against autograd through
    the plain formula (`divergence_from_logps` of two log-softmaxes), float64, upstream weights per row."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    weights = torch.rand(5, generator=g, dtype=torch.float64)
    plain = divergence_from_logps(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                                  beta)
    (expected,) = torch.autograd.grad((plain * weights).sum(), s)
    terms = generalized_jsd(s, t, beta, temperature)
    torch.testing.assert_close(terms, plain.detach())
    (grad,) = torch.autograd.grad((terms * weights).sum(), s)
    torch.testing.assert_close(grad, expected)


def test_temperature_divides_both_logits():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(generalized_jsd(s, t, beta, temperature=2.0), generalized_jsd(s / 2, t / 2, beta))
    # a hot temperature flattens both distributions towards uniform: the divergence shrinks
    assert generalized_jsd(s, t, 0.5, temperature=50.0).max() < generalized_jsd(s, t, 0.5).min()


def test_top_k_is_exact_with_every_token_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    for beta in (0.0, 0.5, 1.0):
        exact = generalized_jsd(s, t, beta, temperature=0.7)
        full = top_k_generalized_jsd(s, *teacher_top_k(t, 50, 0.7), beta, temperature=0.7)
        torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-5)
        for k in (1, 5, 20):
            approx = top_k_generalized_jsd(s, *teacher_top_k(t, k, 0.7), beta, temperature=0.7)
            assert (approx <= exact + 1e-5).all(), (beta, k)
            assert (approx >= -1e-6).all()


# ---- the teacher's columns and the per-token terms -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair():
    from transformers import AutoModelForCausalLM

    from posttrain.models.builtin import builtin_model_path

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(builtin_model_path(STUDENT))
    teacher = AutoModelForCausalLM.from_pretrained(builtin_model_path(TEACHER)).eval()
    return student, teacher


def _batch(num_rows=3, prompt_len=5, completion_len=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 4000, (num_rows, prompt_len + completion_len), generator=g)
    completion_mask = torch.ones(num_rows, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0  # a shorter completion
    completion_mask[2, 2] = 0  # a token that is context but not trained (e.g. a tool result)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    return {"input_ids": ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _plain_terms(student, teacher, batch, beta, temperature):
    """The per-token divergence from full forward passes, one trained token at a time."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions).logits
    P = batch["input_ids"].shape[1] - batch["completion_mask"].shape[1]
    out = []
    for b, c in batch["completion_mask"].nonzero().tolist():
        out.append(generalized_jsd(s[b, P + c - 1][None], t[b, P + c - 1][None], beta, temperature)[0])
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [None, 4096])
@pytest.mark.parametrize("chunked", [False, True])
def test_masked_terms_match_a_plain_loop(tiny_pair, top_k, chunked, monkeypatch):
    """Per-token terms over the trained tokens only (masked ones contribute nothing), equal to full forward passes;
    with the chunked head (checkpointed chunks of 16 rows: two chunks here) too; a top-k of the whole vocabulary is
    the exact loss."""
    monkeypatch.setattr(teachers, "DIVERGENCE_CHUNK_BYTES", 4096 * 4 * teachers.DIVERGENCE_FLOATS * 16)
    student, teacher = tiny_pair
    batch = _batch()
    batch.update(teachers.teacher_columns(teacher, batch, rows_per_pass=2, top_k=top_k, temperature=0.8))
    terms, metrics = teachers.divergence_terms(student, batch, output_head(teacher) if top_k is None
                                               else None, beta=0.5, temperature=0.8, chunked_lm_head=chunked)
    assert terms.shape == (int(batch["completion_mask"].sum()),)
    expected = _plain_terms(student, teacher, batch, 0.5, 0.8)
    torch.testing.assert_close(terms, expected, rtol=2e-4, atol=1e-6)
    assert metrics["entropy"] > 0
    # changing a token that is not trained (the last of row 1, after its completion) changes nothing
    altered = dict(batch)
    altered["input_ids"] = batch["input_ids"].clone()
    altered["input_ids"][1, -1] = 7
    again, _ = teachers.divergence_terms(student, altered, output_head(teacher), 0.5, 0.8)
    torch.testing.assert_close(again, terms, rtol=2e-4, atol=1e-6)
    terms.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.lm_head.weight.grad is not None or student.model.embed_tokens.weight.grad is not None
    student.zero_grad()


# ---- trainers -------------------------------------------------------------------------------------------------
def _args(tmp_path, cls=DistillationConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_completion_length=8,
                learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0)
    base.update(kw)
    return cls(**base)


def _prompts(n=8, conversational=False):
    return load_builtin_dataset("posttrain/arith-prompts", "conversational" if conversational else None,
                                split=f"train[:{n}]")


@pytest.mark.parametrize("conversational", [False, True])
def test_distillation_trains_the_student_only(tmp_path, conversational):
    trainer = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(conversational=conversational),
                                  args=_args(tmp_path, beta=0.5, max_steps=1, max_completion_length=4))
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("loss", "entropy", "timing/generate", "timing/teacher", "completions/mean_length"):
        assert key in logs, key
    assert "reward" not in logs and "timing/score" not in logs
    assert logs["loss"] > 0 and math.isfinite(logs["loss"])
    assert sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()) > 0.9 * len(before)
    assert all(torch.equal(teacher_before[n], p) for n, p in trainer.teacher_model.named_parameters())
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert trainer.ref_model is None


def test_checkpoint_holds_the_student_only_and_resume_matches(tmp_path):
    """Checkpoints hold the student's weights (not the teacher's); resuming mid generation cycle (the teacher's
    columns come back with the rollout buffer) gives the uninterrupted run's losses."""
    def run(out, **kw):
        return DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(16),
                                   args=_args(tmp_path, output_dir=str(out), max_steps=3, save_steps=1,
                                              save_strategy="steps", per_device_train_batch_size=2,
                                              steps_per_generation=2, max_completion_length=4, **kw))
    first = run(tmp_path / "a")
    first.train()
    losses = [h["loss"] for h in first.state.log_history if "loss" in h]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "a" / "checkpoint-1" / "model.safetensors"))
    student_keys = set(first.model.state_dict())
    assert set(weights) <= student_keys and len(weights) > 0
    assert sum(w.numel() for w in weights.values()) < sum(p.numel() for p in first.teacher_model.parameters())
    resumed = run(tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))  # mid generation cycle
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == losses


def test_teacher_top_k_option(tmp_path):
    trainer = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(),
                                  args=_args(tmp_path, teacher_top_k=8, max_steps=1))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def _sft_rows(n=8, conversational=False):
    return load_builtin_dataset("posttrain/arith-sft", "conversational" if conversational else None,
                                split=f"train[:{n}]")


@pytest.mark.parametrize("lmbda,seq_kd,source", [(0.0, False, "dataset"), (1.0, False, "student"),
                                                 (0.0, True, "teacher")])
def test_gkd_batch_sources(tmp_path, lmbda, seq_kd, source):
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(),
                         args=_args(tmp_path, GKDConfig, lmbda=lmbda, seq_kd=seq_kd, max_steps=1))
    seen = []
    original = trainer.batch_source
    trainer.batch_source = lambda: seen.append(original()) or seen[-1]
    trainer.train()
    assert seen == [source]
    logs = trainer.state.log_history[0]
    assert logs["on_policy"] == float(source == "student") and math.isfinite(logs["loss"])


def test_gkd_dataset_rollout_is_the_datasets_completion(tmp_path):
    data = _sft_rows(4)
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=data,
                         args=_args(tmp_path, GKDConfig, lmbda=0.0, max_completion_length=64))
    rollout = trainer.dataset_rollout([data[0], data[1]])
    tok = trainer.processing_class
    text = tok.decode(rollout.completion_ids[0][rollout.completion_mask[0].bool()], skip_special_tokens=True)
    assert text == data[0]["completion"]
    assert not rollout.is_truncated.any()
    assert rollout.completion_ids[0][rollout.completion_mask[0].bool()][-1] == tok.eos_token_id


def test_gkd_lmbda_mixes_batches_reproducibly(tmp_path):
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(),
                         args=_args(tmp_path, GKDConfig, lmbda=0.5))
    trainer.model.train()
    draws = []
    for step in range(200):
        trainer._micro_step = step
        draws.append(trainer.batch_source())
    assert 0.4 < draws.count("student") / 200 < 0.6 and set(draws) == {"student", "dataset"}
    trainer._micro_step = 7
    assert trainer.batch_source() == draws[7]


def test_gkd_takes_messages_data(tmp_path):
    rows = _sft_rows(8, conversational=True)
    data = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=data,
                         args=_args(tmp_path, GKDConfig, lmbda=0.0, max_steps=1, max_new_tokens=32))
    assert trainer.args.max_completion_length == 32
    assert trainer.train_dataset.column_names == ["prompt", "completion"]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# ---- bad input --------------------------------------------------------------------------------------------------
def test_no_teacher_is_one_line(tmp_path):
    with pytest.raises(UserError, match="needs a teacher"):
        DistillationTrainer(STUDENT, args=_args(tmp_path), train_dataset=_prompts())


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"vocabulary \(32000 tokens\) differs"):
        DistillationTrainer(STUDENT, teacher_model="posttrain/tiny-15m", args=_args(tmp_path),
                            train_dataset=_prompts())


def test_student_as_teacher_is_refused(tmp_path):
    from posttrain.models.loading import load_pretrained_model

    model = load_pretrained_model(__import__("posttrain.models.builtin", fromlist=["x"]).builtin_model_path(STUDENT))
    with pytest.raises(UserError, match="student itself"):
        DistillationTrainer(model, teacher_model=model, args=_args(tmp_path), train_dataset=_prompts())


def test_empty_prompts_are_one_line(tmp_path):
    data = Dataset.from_list([{"prompt": "1+1="}, {"prompt": ""}])
    with pytest.raises(UserError, match="empty or missing 'prompt'"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, args=_args(tmp_path), train_dataset=data)


def test_gkd_without_completions_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no 'completion' column"):
        GKDTrainer(STUDENT, teacher_model=TEACHER, args=_args(tmp_path, GKDConfig), train_dataset=_prompts())
    # prompts only are fine when every batch is sampled
    GKDTrainer(STUDENT, teacher_model=TEACHER, args=_args(tmp_path, GKDConfig, lmbda=1.0), train_dataset=_prompts())


def test_config_refusals():
    with pytest.raises(ValueError, match="beta must be in"):
        DistillationConfig(output_dir="x", beta=1.5)
    with pytest.raises(ValueError, match="lmbda must be in"):
        GKDConfig(output_dir="x", lmbda=-0.1)
    with pytest.raises(ValueError, match="teacher_top_k"):
        DistillationConfig(output_dir="x", teacher_top_k=0)
    with pytest.raises(TypeError, match="used by .*GRPOTrainer"):
        DistillationConfig(output_dir="x", reward_funcs=["accuracy_reward"])
    with pytest.raises(TypeError, match="used by .*DistillationTrainer"):
        GKDConfig(output_dir="x", tools=["m:f"])
    with pytest.raises(TypeError, match="GKDTrainer"):
        from posttrain.configs.grpo import GRPOConfig

        GRPOConfig(output_dir="x", lmbda=0.5)


def test_reward_funcs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="does not take reward_funcs"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, reward_funcs=len, args=_args(tmp_path),
                            train_dataset=_prompts())


# ---- the options shared with GRPO (TRL 1.16's DistillationConfig fields), tools, GKD's SFT fields ----------------
def test_rendering_padding_and_printed_sample_options_act_as_in_grpo(tmp_path, capsys):
    import dataclasses

    from posttrain.configs.grpo import GRPOConfig
    from posttrain.configs.online import RenderedRolloutConfig

    shared = {f.name for f in dataclasses.fields(RenderedRolloutConfig)}
    assert {"chat_template_kwargs", "pad_to_multiple_of", "num_completions_to_print", "log_unique_prompts",
            "cache_implementation", "ds3_gather_for_generation", "vllm_mode"} <= shared
    assert issubclass(DistillationConfig, RenderedRolloutConfig) and issubclass(GRPOConfig, RenderedRolloutConfig)
    trainer = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(8, conversational=True),
                                  args=_args(tmp_path, max_steps=1, chat_template_kwargs='{"enable_thinking": false}',
                                             pad_to_multiple_of=8, log_completions=True, num_completions_to_print=1,
                                             log_unique_prompts=True, cache_implementation="static",
                                             ds3_gather_for_generation=False))
    assert trainer.generation_kwargs()["cache_implementation"] == "static"
    tok = trainer.processing_class
    seen, original = [], tok.apply_chat_template

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_thinking"))
        return original(*args, **kwargs)

    tok.apply_chat_template = spy
    rows = [dict(r) for r in _prompts(4, conversational=True)]
    rollout = trainer.make_rollout(rows)
    assert seen and set(seen) == {False}  # every prompt rendered with the config's chat_template_kwargs
    assert rollout.prompt_ids.shape[1] % 8 == 0 and rollout.completion_ids.shape[1] % 8 == 0
    tok.apply_chat_template = original
    trainer.train()
    out = capsys.readouterr().out
    assert "completions at step" in out
    assert (tmp_path / "out" / "completions.jsonl").exists()


def test_vllm_options_without_vllm_are_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ValueError, match="use_vllm=True needs the vllm package"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(), args=_args(tmp_path,
                                                                                                 use_vllm=True))
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode applies to vLLM generation only"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(),
                            args=_args(tmp_path, vllm_enable_sleep_mode=True))


def test_distillation_trains_with_tools(tmp_path):
    """TRL's DistillationTrainer takes tools=: multi-turn rollouts with the tool results in the context and outside
    the trained tokens, so the teacher scores (and the student learns) the model's own turns only."""
    from test_agentic import PROMPT, TOOLS_TEMPLATE, calculator, scripted

    data = Dataset.from_dict({"prompt": [PROMPT] * 4})
    trainer = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=data, tools=[calculator],
                                  args=_args(tmp_path, max_steps=1, max_completion_length=96, log_completions=True,
                                             chat_template_path=TOOLS_TEMPLATE, max_tool_calling_iterations=2))
    trainer._generate_turn = scripted(trainer.processing_class)
    rollout = trainer.make_rollout([dict(r) for r in data])
    assert rollout.completion_mask.sum() > rollout.loss_mask.sum() > 0  # tool tokens are context only
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["tools/call_frequency"] == 1.0 and math.isfinite(logs["loss"]) and logs["loss"] > 0
    with pytest.raises(TypeError, match="GKDTrainer does not take tools="):
        GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(), tools=[calculator],
                   args=_args(tmp_path, GKDConfig))


def test_gkd_max_length_and_template_kwargs_apply_to_dataset_rows(tmp_path):
    rows = [dict(r) for r in _sft_rows(2, conversational=True)]
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(4),
                         args=_args(tmp_path, GKDConfig, lmbda=0.0, max_completion_length=64))
    full = trainer.dataset_rollout(rows)
    prompt_len = [int(n) for n in full.prompt_mask.sum(1)]
    completion_len = [int(n) for n in full.completion_mask.sum(1)]
    trainer.args.max_length = max_length = prompt_len[0] + completion_len[0] - 3
    cut = trainer.dataset_rollout(rows)
    # the last max_length tokens: the prompt loses its first 3 tokens, the completion is whole
    assert int(cut.prompt_mask[0].sum()) == prompt_len[0] - 3
    assert torch.equal(cut.completion_ids[0][:completion_len[0]], full.completion_ids[0][:completion_len[0]])
    kept_prompt = cut.prompt_ids[0][cut.prompt_mask[0].bool()]
    assert torch.equal(kept_prompt, full.prompt_ids[0][full.prompt_mask[0].bool()][3:])
    assert trainer._prompt_ids(rows[0]["prompt"])[-1] == kept_prompt[-1] and \
        len(trainer._prompt_ids("x " * 400)) == max_length  # sampled batches' prompts too
    trainer.args.max_length = 4  # shorter than the completion: its last tokens, one of them as the prompt
    tiny = trainer.dataset_rollout(rows[:1])
    assert int(tiny.prompt_mask.sum()) == 1 and int(tiny.completion_mask.sum()) == 3
    trainer.args.max_length = None
    tok, seen, original = trainer.processing_class, [], trainer.processing_class.apply_chat_template
    trainer.args.chat_template_kwargs = {"custom": 1}
    tok.apply_chat_template = lambda *a, **kw: seen.append(kw.get("custom")) or original(*a, **kw)
    trainer.dataset_rollout(rows[:1])
    assert seen and set(seen) == {1}


def test_gkd_sft_options_trl_ignores_are_refused_unless_default(tmp_path):
    GKDConfig(output_dir="x", packing=False, dataset_text_field="text", loss_type="nll",
              dataset_kwargs={"skip_prepare_dataset": True})  # a TRL script's explicit defaults
    for name, value in (("packing", True), ("assistant_only_loss", True), ("dataset_text_field", "content"),
                        ("truncation_mode", "keep_end"), ("loss_type", "dft")):
        with pytest.raises(ValueError, match=f"{name}=.* has no effect in GKD"):
            GKDConfig(output_dir="x", **{name: value})
    with pytest.raises(TypeError, match="does not take formatting_func"):
        GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(), formatting_func=str,
                   args=_args(tmp_path, GKDConfig))
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(),
                         args=_args(tmp_path, GKDConfig, eos_token="<|im_end|>"))
    assert trainer.processing_class.eos_token == "<|im_end|>"
    assert GKDConfig(output_dir="x").learning_rate == 2e-5  # TRL's GKDConfig (SFT's default)


# ---- CLI and public API -------------------------------------------------------------------------------------------
def test_public_names():
    import posttrain

    assert posttrain.DistillationTrainer is DistillationTrainer and posttrain.GKDConfig is GKDConfig


def test_cli_distillation_and_example(tmp_path, capsys):
    from posttrain.cli import main, parse_command_args

    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "distillation.yaml")
    _, _, args = parse_command_args("distillation", ["--config", example])
    assert isinstance(args, DistillationConfig) and args.teacher_model_name_or_path
    code = main(["distillation", "--model_name_or_path", STUDENT, "--teacher_model_name_or_path", TEACHER,
                 "--dataset_name", "posttrain/arith-prompts", "--max_steps", "1", "--per_device_train_batch_size",
                 "2", "--max_completion_length", "4", "--output_dir", str(tmp_path / "cli"), "--report_to", "none",
                 "--save_strategy", "no"])
    assert code == 0, capsys.readouterr().err
    assert main(["gkd", "--model_name_or_path", STUDENT, "--dataset_name", "posttrain/arith-sft",
                 "--output_dir", str(tmp_path / "gkd"), "--max_steps", "1"]) == 2
    assert "needs a teacher" in capsys.readouterr().err


# ---- TRL's documented call forms, with only the import changed ----------------------------------------------------
DISTILLATION_SCRIPT = '''
from datasets import load_dataset
from posttrain import DistillationConfig, DistillationTrainer  # was: from trl import DistillationConfig, ...

dataset = load_dataset("json", data_files="prompts.jsonl", split="train")  # was: "trl-lib/tldr" on the Hub

training_args = DistillationConfig(output_dir="tiny-Distillation", beta=0.5, max_completion_length=8,
                                   per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                                   logging_steps=1, report_to="none")
trainer = DistillationTrainer(model=STUDENT, teacher_model=TEACHER, args=training_args, train_dataset=dataset)
trainer.train()
trainer.save_model(training_args.output_dir)
'''

GKD_SCRIPT = '''
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from posttrain import GKDConfig, GKDTrainer  # was: from trl.experimental.gkd import GKDConfig, GKDTrainer

tokenizer = AutoTokenizer.from_pretrained(STUDENT)
model = AutoModelForCausalLM.from_pretrained(STUDENT)
teacher_model = AutoModelForCausalLM.from_pretrained(TEACHER)

train_dataset = Dataset.from_dict({
    "messages": [
        [{"role": "user", "content": "Hi, how are you?"}, {"role": "assistant", "content": "I'm great thanks"}],
    ] * 8
})
eval_dataset = Dataset.from_dict({
    "messages": [
        [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is blue"}],
    ] * 2
})

training_args = GKDConfig(output_dir="gkd-model", per_device_train_batch_size=1, max_new_tokens=8, max_steps=3,
                          report_to="none")
trainer = GKDTrainer(
    model=model,
    teacher_model=teacher_model,
    args=training_args,
    processing_class=tokenizer,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
)
trainer.train()
'''


@pytest.mark.parametrize("script", [DISTILLATION_SCRIPT, GKD_SCRIPT], ids=["distillation", "gkd"])
def test_trl_script_runs_with_the_import_changed(tmp_path, monkeypatch, script):
    import json

    from posttrain.models.builtin import builtin_model_path

    monkeypatch.chdir(tmp_path)
    with open("prompts.jsonl", "w") as f:
        for row in _prompts(8):
            f.write(json.dumps({"prompt": row["prompt"]}) + "\n")
    scope = {"STUDENT": builtin_model_path(STUDENT), "TEACHER": builtin_model_path(TEACHER)}
    exec(compile(script, "trl_script.py", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.slow
def test_killed_distillation_run_resumes_to_the_same_losses(tmp_path, tmp_path_factory):
    """SIGKILL a distillation run at a random moment after a checkpoint; resumed, it reproduces the uninterrupted
    run's losses (the student from the checkpoint, the teacher loaded again, the rollout buffer restored)."""
    import random

    from test_resume import _kill_at_random, _reference, _resume_in_process, _start

    reference = _reference("distillation", tmp_path_factory)
    out = tmp_path / "run"
    proc = _start("distillation", out, POSTTRAIN_TEST_STEP_SLEEP=0.3, POSTTRAIN_TEST_SAVE_STEPS=1)
    killed_after = _kill_at_random(proc, out, random.Random("distillation-1"))
    assert killed_after < len(reference)
    assert _resume_in_process("distillation", out) == reference


def test_distillation_takes_trls_prompt_and_logging_fields(tmp_path):
    """TRL's DistillationConfig fields shared with GRPO: chat_template_kwargs (config, then the row's column) reach
    the template for generated and dataset prompts (GKD); pad_to_multiple_of and the printed sample's options
    are taken and the run trains."""
    args = _args(tmp_path, GKDConfig, lmbda=0.0, chat_template_kwargs='{"enable_thinking": false}',
                 pad_to_multiple_of=8, num_completions_to_print=1, log_unique_prompts=True, log_completions=True,
                 max_steps=1, max_completion_length=4)
    rows = _sft_rows(8, conversational=True)
    trainer = GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=Dataset.from_list(rows), args=args)
    assert (trainer.args.chat_template_kwargs, trainer.args.pad_to_multiple_of) == ({"enable_thinking": False}, 8)
    tok, seen = trainer.processing_class, []
    original = tok.apply_chat_template

    def spy(*a, **kw):
        seen.append(kw.get("enable_thinking"))
        return original(*a, **kw)

    tok.apply_chat_template = spy
    trainer.dataset_rollout([{**rows[0], "chat_template_kwargs": {"enable_thinking": True}}])
    assert seen and set(seen) == {True}  # the row's own value wins over the config's
    seen.clear()
    trainer.dataset_rollout([rows[0]])
    assert seen and set(seen) == {False}
    tok.apply_chat_template = original
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_distillation_takes_tools_as_trl(tmp_path):
    def double(x: int) -> int:
        """Double a number.

        Args:
            x: the number
        """
        return 2 * x

    args = _args(tmp_path, max_steps=1, max_completion_length=4, chat_template_path="posttrain/chatml-tools")
    trainer = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_prompts(conversational=True),
                                  args=args, tools=[double])
    assert trainer.agent is not None and "double" in str(trainer.agent.schemas)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    with pytest.raises(TypeError, match="does not take tools="):
        GKDTrainer(STUDENT, teacher_model=TEACHER, train_dataset=_sft_rows(), tools=[double],
                   args=_args(tmp_path, GKDConfig))
