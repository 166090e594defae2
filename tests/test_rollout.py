"""Generation: one prefill per prompt group gives the same completions; EOS masking; left padding."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.builtin import builtin_model_path
from posttrain.rollout.hf import completion_mask_after_eos, generate, left_pad


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_mask_after_eos():
    mask, truncated = completion_mask_after_eos(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), {2})
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and truncated.tolist() == [False, True]


def test_shared_prefill_matches_plain_generate():
    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok("Question: Mia has 7 apples and buys 5 more.\nAnswer:")["input_ids"], tok("Q: 3 + 4?")["input_ids"]]
    shared = generate(model, tok, prompts, 3, 10, {"do_sample": False}, share_prefill=True)
    plain = generate(model, tok, prompts, 3, 10, {"do_sample": False}, share_prefill=False)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert shared.prompt_ids.shape[0] == 6 and torch.equal(shared.prompt_ids[0], shared.prompt_ids[2])


def test_generation_accuracy_scores_greedy_and_sampled_completions():
    """Held-out evaluation: a reward that checks a known completion gives the fraction of prompts that match."""
    import datasets

    from posttrain.evaluation import generation_accuracy

    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = datasets.Dataset.from_list([{"prompt": f"Question: {i} + 1?\nAnswer:", "answer": str(i + 1)}
                                       for i in range(5)])
    greedy = generate(model, tok, [tok(r["prompt"])["input_ids"] for r in rows], 1, 6, {"do_sample": False})
    texts = tok.batch_decode(greedy.completion_ids, skip_special_tokens=True)
    wanted = texts[:2] + ["never"] * 3  # the first two prompts' greedy completions are "right"

    def matches(completions, prompts, **kwargs):
        return [1.0 if c == wanted[int(p.split()[1])] else 0.0 for c, p in zip(completions, prompts)]

    result = generation_accuracy(model, tok, rows, reward_func=matches, max_new_tokens=6, batch_size=2)
    assert result["accuracy"] == 0.4 and result["num_prompts"] == 5 and len(result["examples"]) == 3
    sampled = generation_accuracy(model, tok, rows, reward_func=matches, max_new_tokens=6, temperature=1.0,
                                  num_samples=3)
    assert 0.0 <= sampled["accuracy"] <= 1.0 and sampled["mean_length"] > 0
    assert model.training is False  # left in the mode it was given


def test_inverse_cdf_sampling_draws_the_same_distribution_and_restores_torch():
    from posttrain.rollout.hf import inverse_cdf_sampling

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 40) * 2, -1)
    probs[:, 5] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    original = torch.multinomial
    with inverse_cdf_sampling("cpu"):
        assert torch.multinomial is not original
        draws = torch.cat([torch.multinomial(probs, 1) for _ in range(20000)], 1)
        several = torch.multinomial(probs, 2)  # other calls go to torch's own
    assert torch.multinomial is original and several.shape == (3, 2)
    freq = torch.stack([torch.bincount(row, minlength=40).float() / row.numel() for row in draws])
    assert (freq - probs).abs().max() < 0.01
    assert not (draws == 5).any()  # a zero-probability token is never drawn
    one_hot = torch.zeros(2, 40)
    one_hot[0, 39] = one_hot[1, 0] = 1.0  # edges of the vocabulary
    with inverse_cdf_sampling("cpu"):
        assert torch.multinomial(one_hot, 1).view(-1).tolist() == [39, 0]
