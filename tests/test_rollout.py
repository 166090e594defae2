"""Generation: one prefill per prompt group gives the same completions; EOS masking; left padding."""

import pytest
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
    assert result["scores"] == [1.0, 1.0, 0.0, 0.0, 0.0]  # per question, in data set order
    sampled = generation_accuracy(model, tok, rows, reward_func=matches, max_new_tokens=6, temperature=1.0,
                                  num_samples=3)
    assert 0.0 <= sampled["accuracy"] <= 1.0 and sampled["mean_length"] > 0
    assert model.training is False  # left in the mode it was given


def test_answers_are_decoded_shortest_prompt_first_and_reported_in_data_set_order():
    """`answer_batches` decodes rows by prompt length (less padding per batch); every result keeps the data set's
    order: per-question scores, sampled scores, examples, chat examples, pairs."""
    import datasets

    from posttrain.evaluation import answer_batches, chat_examples, generation_accuracy, greedy_and_sampled_accuracy
    from posttrain.pairs import sample_pairs

    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": "Question: " + "seven " * (6 - k) + "?\nAnswer:", "k": k} for k in range(6)]  # longest first
    decoded = [i for batch in answer_batches(model, tok, rows, 2, 4, {"do_sample": False}, 4) for i in batch["index"]]
    assert decoded == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0]

    def row_number(completions, k, **kwargs):
        return [float(x) for x in k]

    greedy = generation_accuracy(model, tok, datasets.Dataset.from_list(rows), reward_func=row_number,
                                 max_new_tokens=4, batch_size=4)
    assert greedy["scores"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [e[0] for e in greedy["examples"]] == [r["prompt"] for r in rows[:3]]
    both = greedy_and_sampled_accuracy(model, tok, rows, num_samples=2, sampled_prompts=4, reward_func=row_number,
                                       max_new_tokens=4, batch_size=6)
    assert both[0]["scores"] == greedy["scores"] and both[1]["scores"] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert [prompt for prompt, _ in chat_examples(model, tok, rows[:4], 4)] == [r["prompt"] for r in rows[:4]]

    class ByRow:  # chosen / rejected differ on every row: one pair per row
        def __call__(self, prompts, completions, completion_ids, columns):
            return [[float(i % 2) for i in range(len(completions))]]

        def weighted_sum(self, scores):
            return torch.tensor(scores[0])

    pairs, counts = sample_pairs(model, tok, rows, ByRow(), num_generations=2, max_new_tokens=4, batch_size=4)
    assert [p["k"] for p in pairs] == list(range(6)) and counts["pairs"] == 6


def test_greedy_first_rows_are_the_greedy_answers_from_the_same_prefill():
    """generate(greedy_first=True): each prompt's first row is what greedy decoding gives, the others are samples
    (at T = 0.7 with top-k, whose warpers keep the largest logit largest); per-prompt counts too. Refused where the
    loop cannot mix them (greedy options, transformers' generate)."""
    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok("Question: Mia has 7 apples and buys 5 more.\nAnswer:")["input_ids"], tok("Q: 3 + 4?")["input_ids"],
               tok("Tell me a story")["input_ids"]]
    greedy = generate(model, tok, prompts, 1, 12, {"do_sample": False})
    torch.manual_seed(0)
    mixed = generate(model, tok, prompts, 4, 12, {"do_sample": True, "temperature": 0.7, "top_k": 50},
                     greedy_first=True)
    width = greedy.completion_ids.shape[1]
    for i in range(3):
        assert torch.equal(mixed.completion_ids[4 * i, :width], greedy.completion_ids[i])
        assert torch.equal(mixed.completion_mask[4 * i, :width], greedy.completion_mask[i])
    samples = mixed.completion_ids[[1, 2, 3, 5, 6, 7, 9, 10, 11]]
    assert any(not torch.equal(samples[j], mixed.completion_ids[0]) for j in range(3))  # sampled, not all greedy
    counts = generate(model, tok, prompts, [2, 1, 3], 12, {"do_sample": True}, greedy_first=True)
    for row, i in ((0, 0), (2, 1), (3, 2)):  # the first row of each group
        assert torch.equal(counts.completion_ids[row, :width], greedy.completion_ids[i])
    with pytest.raises(ValueError, match="greedy_first needs sampling"):
        generate(model, tok, prompts, 2, 4, {"do_sample": False}, greedy_first=True)
    with pytest.raises(ValueError, match="greedy_first needs sampling"):
        generate(model, tok, prompts, 2, 4, {"do_sample": True, "num_beams": 2}, greedy_first=True)


def test_greedy_and_sampled_accuracy_in_one_pass_matches_two(monkeypatch):
    """One prefill for a question's greedy and sampled answers: the greedy scores are generation_accuracy's; the
    samples cover the first sampled_prompts questions; without the static loop it falls back to two passes."""
    import datasets

    import posttrain.rollout.hf as hf
    from posttrain.evaluation import generation_accuracy, greedy_and_sampled_accuracy
    from posttrain.errors import UserError

    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = datasets.Dataset.from_list([{"prompt": f"Question: {i} + 1?\nAnswer:", "answer": str(i + 1)}
                                       for i in range(7)])

    def digits(completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    plain = generation_accuracy(model, tok, rows, reward_func=digits, max_new_tokens=6, batch_size=4)
    greedy, sampled = greedy_and_sampled_accuracy(model, tok, rows, num_samples=2, temperature=1.0,
                                                  sampled_prompts=3, reward_func=digits, max_new_tokens=6,
                                                  batch_size=4)
    assert greedy["scores"] == plain["scores"] and greedy["examples"] == plain["examples"]
    assert greedy["num_prompts"] == 7 and sampled["num_prompts"] == 3 and len(sampled["scores"]) == 6
    assert sampled["mean_length"] > 0 and model.training is False
    monkeypatch.setattr(hf, "greedy_first_supported", lambda *a, **k: False)
    greedy2, sampled2 = greedy_and_sampled_accuracy(model, tok, rows, num_samples=2, temperature=1.0,
                                                    sampled_prompts=3, reward_func=digits, max_new_tokens=6,
                                                    batch_size=4)
    assert greedy2["scores"] == plain["scores"] and len(sampled2["scores"]) == 6 and sampled2["num_prompts"] == 3
    with pytest.raises(UserError, match="sampled_prompts >= 1"):
        greedy_and_sampled_accuracy(model, tok, rows, sampled_prompts=0)


def test_evaluation_decodes_in_bf16_on_a_copy_where_bf16_is_native(monkeypatch):
    """dtype=bfloat16: the answers come from a bf16 copy (the model stays float32); on hardware without native bf16
    the option is refused in one line (emulated bf16 is ~30x slower)."""
    import datasets

    from posttrain import hardware
    from posttrain.errors import UserError
    from posttrain.evaluation import decoding_dtype, decoding_model, generation_accuracy

    model = AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny")).eval()
    tok = AutoTokenizer.from_pretrained(builtin_model_path("posttrain/tiny"))
    assert decoding_dtype("float32") is None and decoding_model(model) is model
    copy = decoding_model(model, torch.bfloat16)
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    rows = datasets.Dataset.from_list([{"prompt": f"Question: {i} + 1?\nAnswer:"} for i in range(3)])
    seen = []

    def lengths(completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        return [1.0] * len(completions)

    result = generation_accuracy(model, tok, rows, reward_func=lengths, max_new_tokens=5, dtype=torch.bfloat16)
    assert result["accuracy"] == 1.0 and len(seen) == 3 and next(model.parameters()).dtype == torch.float32
    monkeypatch.setattr(hardware, "bf16_is_slow_here", lambda use_cpu=False: True)
    with pytest.raises(UserError, match="no native bf16"):
        decoding_dtype("bfloat16")
    assert decoding_dtype("auto") is None  # auto: float32 where bf16 would be emulated
    monkeypatch.setattr(hardware, "bf16_is_slow_here", lambda use_cpu=False: False)
    assert decoding_dtype("bfloat16") is torch.bfloat16
    assert decoding_dtype("auto") is torch.bfloat16
    with pytest.raises(UserError, match="use float32, bfloat16 or auto"):
        decoding_dtype("float16")


def test_paired_comparison_is_the_exact_mcnemar_test():
    """Fixed/broken counts and the two-sided binomial p on the disagreeing questions, against hand figures."""
    from posttrain.evaluation import paired_comparison

    before = [True] * 50 + [False] * 10 + [True] * 2 + [False] * 38
    after = [True] * 50 + [True] * 10 + [False] * 2 + [False] * 38
    result = paired_comparison(before, after)
    # 12 disagreements, 10 fixed, 2 broken: p = 2 · (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 · 79 / 4096
    assert result["fixed"] == 10 and result["broken"] == 2
    assert result["p_value"] == pytest.approx(2 * 79 / 4096)
    assert paired_comparison(after, before)["p_value"] == result["p_value"]  # two-sided: symmetric
    assert paired_comparison([True, False], [False, True])["p_value"] == 1.0  # an even split: no evidence
    assert paired_comparison([True], [True]) == {"fixed": 0, "broken": 0, "p_value": 1.0}
    big = paired_comparison([False] * 600 + [True] * 400, [True] * 600 + [False] * 400)  # 2^1000 stays exact
    assert big["fixed"] == 600 and 0 < big["p_value"] < 1e-9
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([True], [True, False])


def test_paired_comparison_on_sampled_fractions_is_the_sign_test():
    """Per-question fractions of k samples right: questions that went up count as fixed, down as broken, ties drop."""
    from posttrain.evaluation import paired_comparison

    before = [0.0, 0.25, 0.5, 0.5, 1.0, 0.75]
    after = [0.25, 0.5, 0.5, 0.25, 1.0, 1.0]
    result = paired_comparison(before, after)
    # up: questions 0, 1, 5; down: question 3; ties (2, 4) drop: p = 2 · (C(4,0) + C(4,1)) / 2^4 = 10 / 16
    assert result == {"fixed": 3, "broken": 1, "p_value": pytest.approx(10 / 16)}


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


def _transformers_completions(model, tok, prompts, counts, max_new_tokens, kwargs):
    """What `model.generate` samples for the same rows (same seed, same sampler), masked after EOS like ours."""
    from posttrain.rollout.hf import inverse_cdf_sampling

    ids, mask = left_pad(prompts, tok.pad_token_id)
    repeats = counts if isinstance(counts, int) else torch.tensor(counts)
    ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    with torch.no_grad(), inverse_cdf_sampling("cpu"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, **kwargs)[:, ids.shape[1]:]
    keep, _ = completion_mask_after_eos(out, {tok.eos_token_id})
    return out.masked_fill(keep == 0, tok.pad_token_id)


_SAMPLING = [{"do_sample": False}, {"do_sample": True}, {"do_sample": True, "top_k": 0},
             {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02,
              "repetition_penalty": 1.3, "min_new_tokens": 5}]


@pytest.mark.parametrize("counts", [3, [2, 3, 1]])
@pytest.mark.parametrize("kwargs", _SAMPLING)
def test_static_cache_loop_samples_what_transformers_generate_samples(counts, kwargs):
    """The preallocated-cache decode loop (shared prefill, left padding, uneven group sizes, every warper it
    implements) gives token for token what `generate` gives under the same seed."""
    from posttrain.rollout.hf import _per_row_prompt_lengths, sampling_config, static_decode_supported

    if "repetition_penalty" in kwargs and not _per_row_prompt_lengths():
        pytest.skip("this transformers' repetition penalty takes one prompt length: the loop hands it to generate")
    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok("Question: Mia has 7 apples and buys 5 more.\nAnswer:")["input_ids"], tok("Q: 3 + 4?")["input_ids"],
               tok("Hello")["input_ids"]]
    assert static_decode_supported(model) and sampling_config(model, kwargs, 20) is not None
    torch.manual_seed(1)
    ours = generate(model, tok, prompts, counts, 20, kwargs)
    torch.manual_seed(1)
    theirs = _transformers_completions(model, tok, prompts, counts, 20, kwargs)
    assert ours.completion_ids.shape == theirs.shape == (sum(counts) if isinstance(counts, list) else 9, 20)
    assert torch.equal(ours.completion_ids, theirs)


def test_common_prefix_is_found_among_left_padded_rows_and_moved_to_the_same_columns():
    from posttrain.rollout.hf import common_prefix_length, pads_after_prefix

    ids, mask = left_pad([[7, 8, 9, 1, 2], [7, 8, 9, 3], [7, 8, 4, 5, 6]], pad_id=0)
    assert common_prefix_length(ids, mask) == 2
    assert common_prefix_length(*left_pad([[7, 8], [7, 8, 9]], 0)) == 1  # each row keeps a token of its own
    assert common_prefix_length(*left_pad([[7, 8, 9]], 0)) == 0 and common_prefix_length(*left_pad([[1], [1]], 0)) == 0
    moved, moved_mask = pads_after_prefix(ids, mask, 2)
    assert moved.tolist() == [[7, 8, 9, 1, 2], [7, 8, 0, 9, 3], [7, 8, 4, 5, 6]]
    assert moved_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]


def _small_model(kind: str, tok):
    """The built-in tiny model, or a small random GPT-2 (absolute positions) / eager-attention Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                          eos_token_id=tok.eos_token_id, bos_token_id=None)).eval()
    if kind == "eager-llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None)
        return LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    return AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny")).eval()


@pytest.mark.parametrize("kind", ["tiny", "gpt2", "eager-llama"])
@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": True, "temperature": 0.7, "top_k": 20}])
def test_prompts_with_a_common_head_prefill_it_once_and_decode_what_generate_decodes(monkeypatch, kwargs, kind):
    """Prompts that start alike (a chat template's system prompt) prefill those tokens once for every row; the
    tokens are still those of `generate` under the same seed (left padding moved between head and rest), with
    rotary or absolute positions, sdpa or eager attention."""
    from posttrain.rollout import hf

    tok = AutoTokenizer.from_pretrained(builtin_model_path("posttrain/tiny"))
    model = _small_model(kind, tok)
    head = "System: you are a careful assistant who answers arithmetic questions in one line.\nUser: "
    prompts = [tok(head + q)["input_ids"] for q in ("Mia has 7 apples and buys 5 more. How many?", "3 + 4?",
                                                   "What is 12 times 3?", "Hi")]
    assert hf.common_prefix_length(*left_pad(prompts, tok.pad_token_id)) * 3 >= hf._MIN_SHARED_TOKENS
    widths = []
    original = hf.pads_after_prefix
    monkeypatch.setattr(hf, "pads_after_prefix", lambda ids, mask, shared: (widths.append(shared),
                                                                            original(ids, mask, shared))[1])
    torch.manual_seed(2)
    ours = generate(model, tok, prompts, [2, 1, 3, 2], 16, kwargs)
    assert widths and widths[0] >= 20  # the common head ran once
    torch.manual_seed(2)
    assert torch.equal(ours.completion_ids, _transformers_completions(model, tok, prompts, [2, 1, 3, 2], 16, kwargs))


def test_the_common_head_stays_in_place_where_the_layout_matters(monkeypatch):
    """No split prefill under a repetition penalty (it reads each row's padding) or on a vision-language model (its
    positions may come from the images); the tokens are then the plain loop's."""
    from posttrain.models import loading
    from posttrain.rollout import hf

    moved = []
    monkeypatch.setattr(hf, "pads_after_prefix", lambda *args: moved.append(args) or args[:2])
    tok = AutoTokenizer.from_pretrained(builtin_model_path("posttrain/tiny"))
    head = "System: you are a careful assistant who answers arithmetic questions in one line.\nUser: "
    questions = ("Mia has 7 apples and buys 5 more. How many?", "3 + 4?", "What is 12 times 3?", "Hi")
    prompts = [tok(head + q)["input_ids"] for q in questions]
    generate(_small_model("tiny", tok), tok, prompts, 2, 4, {"do_sample": False, "repetition_penalty": 1.3})
    vlm = loading.load_pretrained_model("posttrain/tiny-llava").eval()
    vlm_tok = loading.load_tokenizer("posttrain/tiny-llava")
    loading.prepare_tokenizer(vlm_tok)
    generate(vlm, vlm_tok, [vlm_tok(head + q)["input_ids"] for q in questions], 2, 4, {"do_sample": False})
    assert moved == []
    generate(_small_model("tiny", tok), tok, prompts, 2, 4, {"do_sample": False})
    assert len(moved) == 1  # the same prompts without the penalty: split


def test_static_cache_loop_on_other_architectures_and_fallbacks():
    """Absolute positions (GPT-2) and eager attention take the loop and match `generate`; a sliding-window model
    and options the loop does not implement (beam search, n-gram blocking) go to `generate` itself."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from posttrain.rollout.hf import sampling_config, static_decode_supported

    tok = AutoTokenizer.from_pretrained(builtin_model_path("posttrain/tiny"))
    small = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id, bos_token_id=None)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      eos_token_id=tok.eos_token_id, bos_token_id=None))
    llama = LlamaForCausalLM._from_config(LlamaConfig(**small), attn_implementation="eager")
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=8))
    prompts = [tok("Question: 3 + 4?\nAnswer:")["input_ids"], tok("Q: 3 + 4?")["input_ids"]]
    for model, loop in ((gpt2, True), (llama, True), (mistral, False)):
        model.eval()
        assert static_decode_supported(model) is loop
        sampled = {"do_sample": True, "temperature": 0.7}
        torch.manual_seed(0)
        ours = generate(model, tok, prompts, 2, 12, sampled)
        torch.manual_seed(0)
        assert torch.equal(ours.completion_ids, _transformers_completions(model, tok, prompts, 2, 12, sampled))
    assert sampling_config(llama, {"num_beams": 2}, 8) is None
    assert sampling_config(llama, {"no_repeat_ngram_size": 2}, 8) is None
    assert sampling_config(llama, {"stop_strings": ["\n"]}, 8) is None


def test_static_cache_loop_stops_when_every_row_has_ended():
    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok("Q: 3 + 4?")["input_ids"]
    first = generate(model, tok, [prompt], 2, 6, {"do_sample": False}).completion_ids[0, 0].item()
    model.generation_config.eos_token_id = first  # greedy decoding now ends every row at its first token
    ended = generate(model, tok, [prompt], 2, 6, {"do_sample": False})
    assert ended.completion_ids.shape == (2, 1) and ended.completion_mask.tolist() == [[1], [1]]
    assert ended.is_truncated.tolist() == [False, False]


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": True, "temperature": 0.7, "top_k": 20}])
def test_rows_that_ended_leave_the_batch_and_the_tokens_do_not_change(monkeypatch, kwargs):
    """With rows ending at different steps, the loop drops ended rows from the batch (and their cache rows) and
    still gives token for token what `generate` gives under the same seed."""
    from posttrain.rollout import hf

    path = builtin_model_path("posttrain/tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok("Question: Mia has 7 apples and buys 5 more.\nAnswer:")["input_ids"], tok("Q: 3 + 4?")["input_ids"],
               tok("Hello")["input_ids"]]
    torch.manual_seed(3)
    free = generate(model, tok, prompts, 4, 16, kwargs).completion_ids  # no row ends on the real EOS here
    ends = sorted({int(row[i]) for row, i in zip(free, [2, 5, 9] * 4)} - {int(t) for t in free[:, :2].flatten()})
    assert ends, "pick end tokens that no row produces in its first two steps"
    model.generation_config.eos_token_id = ends
    dropped = []
    original = hf.PreallocatedLayer.keep_rows
    monkeypatch.setattr(hf.PreallocatedLayer, "keep_rows",
                        lambda self, index: (dropped.append(len(index)), original(self, index))[1])
    torch.manual_seed(3)
    ours = generate(model, tok, prompts, 4, 16, kwargs)
    lengths = ours.completion_mask.sum(1)
    assert lengths.min() < lengths.max() and dropped  # rows ended early and left the batch
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    torch.manual_seed(3)
    with torch.no_grad(), hf.inverse_cdf_sampling("cpu"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, pad_token_id=tok.pad_token_id,
                             **kwargs)[:, ids.shape[1]:]
    keep, _ = completion_mask_after_eos(out, set(ends))
    theirs = out.masked_fill(keep == 0, tok.pad_token_id)
    width = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, theirs[:, :width]) and (theirs[:, width:] == tok.pad_token_id).all()


def test_a_saved_generation_config_with_flags_written_as_false_keeps_the_loop():
    """SmolLM2's generation_config.json writes output_attentions/output_hidden_states as false where transformers'
    default is None: the same "off", so the static-cache loop must still run (it used to fall back to `generate`)."""
    from posttrain.rollout.hf import sampling_config

    model = AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny"))
    model.generation_config.output_attentions = False
    model.generation_config.output_hidden_states = False
    assert sampling_config(model, {"do_sample": True, "temperature": 1.0}, 8) is not None
    model.generation_config.output_scores = True  # an option the loop does not implement still goes to generate
    assert sampling_config(model, {"do_sample": True}, 8) is None
