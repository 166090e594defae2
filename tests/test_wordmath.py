"""The built-in word problems for the real chat model, and the drift check (evaluation.drift_from_reference)."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data import wordmath
from posttrain.data.arith import extract_answer
from posttrain.data.loading import load_any_dataset
from posttrain.models.builtin import builtin_model_path


def test_pool_is_distinct_deterministic_and_every_solution_is_right():
    pool = wordmath._pool()
    assert len({p.question for p in pool}) == len(pool) == 8000
    assert wordmath.generate_problems(50) == list(pool[:50])  # the same seed gives the same questions
    assert {p.steps for p in pool} == {1, 2, 3}
    for p in pool[:2000]:
        lines = p.solution.split("\n")
        for line in lines[:-1]:  # every worked line is true arithmetic
            left, right = line.split(" = ")
            assert eval(left.replace("/", "//")) == int(right), (p.question, line)
        assert extract_answer(p.solution) == p.answer == lines[-2].rsplit("= ", 1)[1]
        assert extract_answer(p.wrong) != p.answer and int(extract_answer(p.wrong)) >= 0
        assert p.question.endswith("?") and not re.search(r"\b(\w+ \w+ \w+)\b.*\b\1\b \1", p.question)


def test_data_sets_keep_test_questions_out_of_every_train_split():
    test = load_any_dataset("posttrain/wordmath-prompts", None, "test")
    assert len(test) == 1000 and set(test.column_names) == {"prompt", "answer", "steps", "solution"}
    held_out = {r["prompt"][0]["content"] for r in test}
    sizes = {}
    for name in ("sft", "pref", "kto", "prompts"):
        train = load_any_dataset(f"posttrain/wordmath-{name}", None, "train")
        questions = {r["prompt"][0]["content"] for r in train}
        assert not questions & held_out
        sizes[name] = (len(train), questions)
    assert sizes["sft"][0] == 3000 and sizes["pref"][0] == sizes["prompts"][0] == 2000
    assert not sizes["sft"][1] & sizes["prompts"][1] and not sizes["pref"][1] & sizes["prompts"][1]
    row = load_any_dataset("posttrain/wordmath-pref", "conversational", "train[:1]")[0]
    assert row["prompt"][0]["content"].endswith(wordmath.INSTRUCTION) and row["chosen"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="Unknown config 'standard'.*'1-step'"):
        load_any_dataset("posttrain/wordmath-sft", "standard", "train")
    with pytest.raises(ValueError, match="use one of: 'conversational'"):
        load_any_dataset("posttrain/chat-prompts", "1-step", "test")


def test_step_configs_keep_the_questions_of_that_many_steps_in_both_splits():
    full = load_any_dataset("posttrain/wordmath-prompts", None, None)
    parts = [load_any_dataset("posttrain/wordmath-prompts", f"{k}-step", None) for k in (1, 2, 3)]
    for split in ("train", "test"):
        assert [set(p[split]["steps"]) for p in parts] == [{1}, {2}, {3}]
        assert sum(len(p[split]) for p in parts) == len(full[split])
        kept = {r["prompt"][0]["content"] for r in parts[0][split]}
        assert kept == {r["prompt"][0]["content"] for r in full[split] if r["steps"] == 1}


def test_chat_prompts_are_distinct_everyday_requests():
    chat = load_any_dataset("posttrain/chat-prompts", None, "test")
    texts = [r["prompt"][0]["content"] for r in chat]
    assert len(texts) == len(set(texts)) == 200 and not any(re.search(r"\d", t) for t in texts)


def _tiny():
    path = builtin_model_path("posttrain/tiny")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_sequence_logps_equal_a_plain_forward():
    from posttrain.evaluation import sequence_logps

    model, tok = _tiny()
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    got = sequence_logps(model, tok, prompts, completions)
    for p, c, value in zip(prompts, completions, got):
        logits = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        want = sum(logits[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert value == pytest.approx(want, abs=1e-4)


def test_drift_is_zero_for_the_start_model_and_estimates_the_kl_of_a_changed_one():
    from posttrain.evaluation import drift_from_reference, reference_samples

    model, tok = _tiny()
    rows = [{"prompt": "Question: 3 + 4?\nAnswer:"}] * 240
    reference = reference_samples(model, tok, rows, max_new_tokens=1, batch_size=120)
    assert drift_from_reference(model, tok, reference, batch_size=120)["kl"] == pytest.approx(0.0, abs=1e-5)
    changed, _ = _tiny()
    with torch.no_grad():
        changed.lm_head.weight.add_(0.5 * torch.randn_like(changed.lm_head.weight))
    drift = drift_from_reference(changed, tok, reference, batch_size=120)
    ids = torch.tensor([tok(rows[0]["prompt"])["input_ids"]])
    with torch.no_grad():
        p = model(ids).logits[0, -1].log_softmax(-1)
        q = changed(ids).logits[0, -1].log_softmax(-1)
    exact = (p.exp() * (p - q)).sum().item()  # one token: the sequence KL is the next-token KL
    assert exact > 0.05 and abs(drift["kl"] - exact) < 4 * drift["kl_stderr"] + 1e-3
    assert drift["kl_per_token"] == pytest.approx(drift["kl"]) and drift["num_prompts"] == 240


def test_drift_reference_sampled_by_a_bf16_copy_keeps_the_models_own_logps():
    """dtype=bfloat16: a bf16 copy samples the answers (decode-bound, 2x faster where bf16 is native); the log-probs
    stored for the KL are still the float32 model's, so the start model's own drift stays 0."""
    from posttrain.evaluation import drift_from_reference, reference_samples, sequence_logps

    model, tok = _tiny()
    rows = [{"prompt": "Question: 3 + 4?\nAnswer:"}] * 8
    reference = reference_samples(model, tok, rows, max_new_tokens=3, batch_size=4, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    want = sequence_logps(model, tok, reference["prompt_ids"], reference["completion_ids"])
    assert reference["seq_logps"] == pytest.approx(want, abs=1e-5)
    assert drift_from_reference(model, tok, reference)["kl"] == pytest.approx(0.0, abs=1e-5)
