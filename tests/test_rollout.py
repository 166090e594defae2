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
