"""Held-out evaluation by generation: sample (or greedily decode) completions for prompts and score them.

`generation_accuracy` answers "how often does the model get the answer right?" on a prompt data set with an
`answer` column (the built-in `posttrain/arith-prompts` test split, GSM8K-style data): one completion per prompt
(greedy by default; `temperature` > 0 samples, and `num_samples` > 1 averages over several samples per prompt),
scored by a reward function (default: `accuracy_reward`). The same rollout path the online trainers use
(`rollout/hf.generate`) does the decoding, so what is evaluated is what those trainers sample.
`paired_comparison` compares two models' scores on the same questions (fixed, broken, exact sign-test / McNemar p).

Not here: rewards (`rewards/`), the trainers' own eval loops (`trainers/online.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from posttrain.data.tokenize import tokenize_prompt
from posttrain.errors import UserError
from posttrain.rewards.protocol import completion_text
from posttrain.rollout.hf import generate


def decoding_model(model, dtype: torch.dtype | None = None):
    """A LoRA/PEFT model as a plain merged copy for decoding (the same outputs up to rounding, without the adapter's
    extra matmuls at every token); with `dtype` (e.g. torch.bfloat16), a copy in that dtype (the model itself is left
    as it is); any other model as it is."""
    import copy

    from posttrain.models.adapters import is_peft_model, merged_copy

    decoder = merged_copy(model).eval() if is_peft_model(model) else model
    if dtype is not None and next(decoder.parameters()).dtype != dtype:
        decoder = (decoder if decoder is not model else copy.deepcopy(model)).to(dtype).eval()
    return decoder


def decoding_dtype(name: str | None) -> torch.dtype | None:
    """The dtype answers are decoded in: "float32" (or None: the model's own), "bfloat16" (only where the hardware
    runs it natively: a bf16 GPU, or a CPU with AVX512-BF16/AMX; elsewhere emulated bf16 is ~30x slower), "auto"
    (bfloat16 where it is native, else float32)."""
    from posttrain import hardware

    if name in (None, "float32"):
        return None
    if name not in hardware.DECODING_DTYPES:
        raise UserError(f"decoding dtype {name!r}: use {hardware.DECODING_DTYPES_TEXT}.")
    if hardware.bf16_is_slow_here(use_cpu=not hardware.has_cuda()):
        if name == "auto":
            return None
        raise UserError("decoding dtype bfloat16: this machine has no native bf16 (no bf16 GPU, no AVX512-BF16/AMX "
                        "CPU), where it runs ~30x slower; use float32 or auto.")
    return torch.bfloat16


def answer_batches(model, tokenizer, rows: list[dict[str, Any]], num_samples: int | list[int], max_new_tokens: int,
                   generation_kwargs: dict[str, Any], batch_size: int, dtype: torch.dtype | None = None,
                   greedy_first: bool = False):
    """Decode `num_samples` answers per row (or one count per row), about `batch_size` answers at a time; yields one
    dict per batch: index (each answer's row number in `rows`), rows (each repeated as many times as it has
    answers, a row's answers consecutive), first (True at each row's first answer), completions (conversational
    when the prompts are), completion_ids (token lists, EOS included when reached), columns (the rows' other
    columns, for reward functions). The rows are decoded shortest prompt first, so that a batch pads its prompts
    little (questions of 72-115 tokens in data-set order: a fifth of the prefill was padding); callers that keep
    data-set order sort by `index`. `dtype`: decode with a copy of the model in that dtype (`decoding_model`).
    `greedy_first`: each row's first answer is its greedy one (`generate`'s greedy_first)."""
    decoder = decoding_model(model, dtype)
    counts = [num_samples] * len(rows) if isinstance(num_samples, int) else list(num_samples)
    prompt_ids = [tokenize_prompt(tokenizer, r["prompt"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompt_ids[i]))  # stable: equal lengths keep their order
    start = 0
    while start < len(order):
        end, answers = start + 1, counts[order[start]]  # at least one row; then rows while the answers fit the batch
        while end < len(order) and answers + counts[order[end]] <= batch_size:
            answers, end = answers + counts[order[end]], end + 1
        chunk = order[start:end]
        chunk_counts = [counts[i] for i in chunk]
        start = end
        rollout = generate(decoder, tokenizer, [prompt_ids[i] for i in chunk],
                           chunk_counts[0] if len(set(chunk_counts)) == 1 else chunk_counts, max_new_tokens,
                           generation_kwargs, greedy_first=greedy_first)
        ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(rollout.completion_ids.tolist(),
                                                                       rollout.completion_mask.tolist())]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        index = [i for i, count in zip(chunk, chunk_counts) for _ in range(count)]
        repeated = [rows[i] for i in index]
        completions = [[{"role": "assistant", "content": t}] for t in texts] \
            if isinstance(rows[chunk[0]]["prompt"], list) else texts
        yield {"index": index, "rows": repeated, "completions": completions, "completion_ids": ids,
               "first": [i == 0 for count in chunk_counts for i in range(count)],  # each row's first answer
               "columns": {k: [r[k] for r in repeated] for k in rows[chunk[0]] if k != "prompt"}}


class _Tally:
    """Scores, lengths and the first three examples of scored answers, in data-set order (answers arrive in the
    decoding order of `answer_batches`): one `generation_accuracy` result."""

    def __init__(self):
        self.answers: list[tuple[int, float | None, float, Any, Any]] = []

    def add(self, index: int, row: dict[str, Any], completion: Any, ids: list[int], reward: float | None) -> None:
        score = None if reward is None or math.isnan(reward) else float(reward)
        self.answers.append((index, score, float(len(ids)), row["prompt"], completion))

    def result(self, num_prompts: int) -> dict[str, Any]:
        answers = sorted(self.answers, key=lambda a: a[0])  # stable: a row's answers keep the order they were drawn in
        scores = [a[1] for a in answers]
        scored = [s for s in scores if s is not None]
        return {"accuracy": sum(scored) / len(scored) if scored else float("nan"),
                "mean_length": sum(a[2] for a in answers) / len(answers), "num_prompts": num_prompts,
                "scores": scores, "examples": [(prompt, completion_text(completion), score)
                                               for _, score, _, prompt, completion in answers[:3]]}


def _batch_rewards(reward_func: Callable, batch: dict[str, Any]) -> list[float | None]:
    return reward_func(prompts=[r["prompt"] for r in batch["rows"]], completions=batch["completions"],
                       completion_ids=batch["completion_ids"], **batch["columns"])


def _evaluation_rows(dataset, reward_func: Callable | None) -> tuple[list[dict[str, Any]], Callable]:
    if reward_func is None:
        from posttrain.rewards.builtin import accuracy_reward as reward_func
    rows = list(dataset)
    if not rows or "prompt" not in rows[0]:
        raise UserError("generation_accuracy needs a non-empty data set with a 'prompt' column.")
    return rows, reward_func


class _Evaluating:
    """The model in eval mode and the random stream seeded, both given back afterwards."""

    def __init__(self, model, seed: int):
        self.model, self.seed = model, seed

    def __enter__(self):
        self.was_training, self.rng_state = self.model.training, torch.get_rng_state()
        self.model.eval()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.rng_state)
        self.model.train(self.was_training)


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """`generate` options for greedy decoding (temperature <= 0) or plain sampling at `temperature` (no top-k/top-p,
    whatever the model's generation_config says)."""
    return {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                          "top_p": 1.0}


@torch.no_grad()
def generation_accuracy(model, tokenizer, dataset, reward_func: Callable | None = None, max_new_tokens: int = 32,
                        batch_size: int = 64, temperature: float = 0.0, num_samples: int = 1,
                        seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Mean reward of the model's completions to `dataset["prompt"]` (other columns reach the reward function).

    Returns {"accuracy": mean reward over scored completions, "mean_length": mean completion tokens,
    "num_prompts": int, "scores": every completion's reward in data set order (a prompt's samples consecutive;
    None where not applicable), "examples": the first 3 (prompt, completion, reward) triples}. Rewards that are
    None (not applicable) or NaN are left out of the mean. `dtype`: decode in that dtype (e.g. torch.bfloat16 on
    hardware with native bf16: the evaluation is decode-bound), the model itself unchanged.
    """
    if temperature <= 0 and num_samples != 1:
        raise UserError("num_samples > 1 needs temperature > 0 (greedy decoding gives the same completion).")
    rows, reward_func = _evaluation_rows(dataset, reward_func)
    tally = _Tally()
    with _Evaluating(model, seed):
        for batch in answer_batches(model, tokenizer, rows, num_samples, max_new_tokens, sampling_kwargs(temperature),
                                    batch_size, dtype):
            for index, row, completion, ids, reward in zip(batch["index"], batch["rows"], batch["completions"],
                                                           batch["completion_ids"], _batch_rewards(reward_func, batch)):
                tally.add(index, row, completion, ids, reward)
    return tally.result(len(rows))


@torch.no_grad()
def greedy_and_sampled_accuracy(model, tokenizer, dataset, num_samples: int = 1, temperature: float = 1.0,
                                sampled_prompts: int | None = None, reward_func: Callable | None = None,
                                max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
                                dtype: torch.dtype | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(greedy, sampled): `generation_accuracy` greedy on every prompt, and with `num_samples` answers at
    `temperature` on the first `sampled_prompts` prompts (all when None) — from one prefill per prompt where the
    decoding loop allows it (a prompt's first answer greedy, the rest sampled: `generate`'s greedy_first), else in
    two passes. The evaluation is prefill-bound on a CPU (a ~90-token prompt costs ~3x its ~27-token answer), so one
    pass instead of two saves ~a third. The same results up to rounding as the two calls of `generation_accuracy`,
    with other random draws for the samples."""
    from posttrain.rollout.hf import greedy_first_supported

    if temperature <= 0 or num_samples < 1 or (sampled_prompts is not None and sampled_prompts < 1):
        raise UserError(f"sampled answers need temperature > 0, num_samples >= 1 and sampled_prompts >= 1 (or None: "
                        f"all), got {temperature}, {num_samples}, {sampled_prompts}.")
    rows, reward_func = _evaluation_rows(dataset, reward_func)
    subset = len(rows) if sampled_prompts is None else min(sampled_prompts, len(rows))
    kwargs = sampling_kwargs(temperature)
    if not greedy_first_supported(model, kwargs, max_new_tokens):
        greedy = generation_accuracy(model, tokenizer, rows, reward_func, max_new_tokens, batch_size, seed=seed,
                                     dtype=dtype)
        sampled = generation_accuracy(model, tokenizer, rows[:subset], reward_func, max_new_tokens, batch_size,
                                      temperature, num_samples, seed, dtype)
        return greedy, sampled
    greedy, sampled = _Tally(), _Tally()
    counts = [1 + num_samples] * subset + [1] * (len(rows) - subset)
    with _Evaluating(model, seed):
        for batch in answer_batches(model, tokenizer, rows, counts, max_new_tokens, kwargs, batch_size, dtype,
                                    greedy_first=True):
            for first, index, row, completion, ids, reward in zip(batch["first"], batch["index"], batch["rows"],
                                                                  batch["completions"], batch["completion_ids"],
                                                                  _batch_rewards(reward_func, batch)):
                (greedy if first else sampled).add(index, row, completion, ids, reward)  # a row's first: greedy
    return greedy.result(len(rows)), sampled.result(subset)


def paired_comparison(before: list[float], after: list[float]) -> dict[str, Any]:
    """Two models' scores on the same questions: how many questions the second scored higher on than the first
    ("fixed"), the reverse ("broken"), and the exact two-sided sign-test p-value — the chance of a split at least this
    uneven between fixed and broken if both models were equally good (a binomial test on the questions where they
    differ). With right/wrong scores (bools) this is the exact McNemar test (McNemar 1947); with each question's
    fraction of k sampled answers right it is the sign test on those fractions. On the same 1,000 questions this
    resolves differences far smaller than each accuracy's own ±1-point standard error, since the questions both
    score equally on cancel out.

    Returns {"fixed": int, "broken": int, "p_value": float}.
    """
    if len(before) != len(after):
        raise UserError(f"paired_comparison needs the same questions: {len(before)} vs {len(after)} results")
    fixed = sum(1 for b, a in zip(before, after) if a > b)
    broken = sum(1 for b, a in zip(before, after) if a < b)
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}


# ---- drift: how far a trained model moved from its start, on prompts outside the task -----------------------------

def _rows_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded completions as one batch with labels on the completion tokens only."""
    from posttrain.models.logprobs import positions_from_mask
    from posttrain.rollout.hf import left_pad

    ids, mask = left_pad(prompt_ids, pad_id)
    width = max(len(c) for c in completion_ids)
    completion = torch.full((len(completion_ids), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros_like(completion)
    for i, c in enumerate(completion_ids):
        completion[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
    input_ids = torch.cat([ids, completion], 1)
    attention_mask = torch.cat([mask, completion_mask], 1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :ids.shape[1]] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": positions_from_mask(attention_mask)}


@torch.no_grad()
def sequence_logps(model, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                   batch_size: int = 16) -> list[float]:
    """log p_model(completion | prompt), summed over the completion's tokens, one float per row."""
    from posttrain.models.logprobs import completion_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = _rows_batch(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size],
                                tokenizer.pad_token_id)
            logps = completion_logps(model, {k: v.to(device) for k, v in batch.items()})["logps"]
            out += logps.double().sum(1).tolist()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def reference_samples(model, tokenizer, dataset, max_new_tokens: int = 64, batch_size: int = 25,
                      seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The start model's own answers to `dataset["prompt"]`, sampled at T=1 from its full distribution (no top-k or
    top-p, so they are draws from p_start itself), with their log-probs: what `drift_from_reference` needs later,
    without keeping the start model. Returns {"prompt_ids", "completion_ids" (lists of token ids, EOS included when
    reached), "seq_logps" (log p_start per answer), "greedy_examples" (the first 3 prompts' greedy answers)}.
    `dtype` (e.g. torch.bfloat16 where native): the answers are sampled by a copy in that dtype; their log-probs
    are still the model's own."""
    rows = list(dataset)
    if not rows or "prompt" not in rows[0]:
        raise UserError("the drift check needs a non-empty data set with a 'prompt' column.")
    prompt_ids = [tokenize_prompt(tokenizer, r["prompt"]) for r in rows]
    completions: list[list[int]] = []
    decoder = decoding_model(model, dtype)
    with _Evaluating(model, seed):
        for start in range(0, len(prompt_ids), batch_size):
            rollout = generate(decoder, tokenizer, prompt_ids[start:start + batch_size], 1, max_new_tokens,
                               sampling_kwargs(1.0))
            for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
                completions.append([t for t, m in zip(ids, mask) if m] or [tokenizer.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completions,
            "seq_logps": sequence_logps(model, tokenizer, prompt_ids, completions),
            "greedy_examples": chat_examples(model, tokenizer, rows[:3], max_new_tokens)}


@torch.no_grad()
def chat_examples(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int = 64) -> list[list[str]]:
    """[prompt text, greedy answer] for a few prompts: the side-by-side generations of a report."""
    answers = sorted((index, completion_text(row["prompt"]), completion_text(completion))
                     for batch in answer_batches(model, tokenizer, rows, 1, max_new_tokens, {"do_sample": False},
                                                 len(rows))
                     for index, row, completion in zip(batch["index"], batch["rows"], batch["completions"]))
    return [[prompt, answer] for _, prompt, answer in answers]


def drift_from_reference(model, tokenizer, reference: dict[str, Any], batch_size: int = 16) -> dict[str, Any]:
    """KL(p_start ‖ p_model) over whole answers, estimated on the start model's own samples y_i ~ p_start(·|x_i):

        KL ≈ (1/N) Σ_i [log p_start(y_i|x_i) − log p_model(y_i|x_i)]

    an unbiased Monte-Carlo estimate (Schulman's k1) of the sequence-level KL, in nats per answer; also per token
    (the sum over all answers divided by their tokens) and the estimate's standard error. 0 for the start model
    itself; a model that kept its behaviour outside the task stays near 0. Answers cut at max_new_tokens make this
    the KL between the two models' distributions over answer prefixes of that length.
    """
    after = sequence_logps(model, tokenizer, reference["prompt_ids"], reference["completion_ids"], batch_size)
    diffs = [b - a for b, a in zip(reference["seq_logps"], after)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    tokens = sum(len(c) for c in reference["completion_ids"])
    return {"kl": mean, "kl_stderr": math.sqrt(var / n), "kl_per_token": sum(diffs) / tokens, "num_prompts": n}
