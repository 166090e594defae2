"""Peak memory and time of one training log-prob pass with the LM head whole vs chunked (CPU, fresh process each).

    python benchmarks/head_memory.py                 # 32k and 128k vocabularies, off and on; writes HEAD-MEMORY.md
    python benchmarks/head_memory.py --vocab 32768 --chunked true    # one configuration, prints JSON

What one step is: `completion_logps` (forward of a small random-weight Qwen2 model, LM head on the trained rows,
fused log-softmax) on ROWS × TOKENS trained tokens, the summed log-probs' backward, then the gradients dropped.
Measured: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the step) minus
its resident set just before the step — so the weights are outside the figure, and activations, logits, softmax,
gradients and temporaries inside it; and the step's wall time. Each configuration runs STEPS steps in its own
process; the table gives the largest peak and the mean time. PyTorch's CPU allocator hands
large blocks back to the system when freed, so RSS follows the tensors alive.
Not measured: GPU memory (no GPU lent), bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS, TOKENS = 2, 4096  # trained tokens per row (each row has one more, untrained, first token)
HIDDEN, LAYERS = 64, 2  # small hidden size: the head matmul, not the logits' memory, scales with it
VOCABS = (32768, 131072)
STEPS = 1  # one step per configuration keeps the whole run near 5 minutes on 2 shared cores
HERE = os.path.dirname(os.path.abspath(__file__))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def measure(vocab: int, chunked: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import logprobs

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TOKENS + 1,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).train()
    input_ids = torch.randint(0, vocab, (ROWS, TOKENS + 1))
    labels = input_ids.clone()
    labels[:, 0] = logprobs.IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    peaks, times, loss = [], [], None
    for _ in range(STEPS):
        before = _status_mib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        out = logprobs.completion_logps(model, batch, with_entropy=True, with_metrics=True, chunked_lm_head=chunked)
        total = out["logps"].sum()
        total.backward()
        seconds = time.perf_counter() - start
        loss = float(total.detach())
        del out, total
        model.zero_grad(set_to_none=True)
        peaks.append(_status_mib("VmHWM") - before)
        times.append(seconds)
    return {"vocab": vocab, "chunked": chunked, "trained_tokens": ROWS * TOKENS, "peak_delta_mib": round(max(peaks)),
            "seconds_per_step": round(sum(times) / len(times), 2), "head_weight_mib": round(vocab * HIDDEN * 4 / 2**20),
            "sum_logps": loss, "head_chunk_rows": logprobs.head_chunk_rows(model.get_output_embeddings())}


def write_report(results: list[dict]) -> None:
    """HEAD-MEMORY.md from the four measurements (vocab × chunked)."""
    by = {(r["vocab"], r["chunked"]): r for r in results}
    n, small, large = ROWS * TOKENS, VOCABS[0], VOCABS[1]
    chunk_rows = {v: by[(v, True)]["head_chunk_rows"] for v in VOCABS}
    rows = "\n".join(f"| {r['vocab']:,} | {'on' if r['chunked'] else 'off'} | {r['head_weight_mib']} | "
                     f"{r['peak_delta_mib']:,} | {r['seconds_per_step']:.1f} | {r['sum_logps']:.2f} |"
                     for r in results)
    growth = {c: by[(large, c)]["peak_delta_mib"] - by[(small, c)]["peak_delta_mib"] for c in (False, True)}
    memory = {v: by[(v, True)]["peak_delta_mib"] / by[(v, False)]["peak_delta_mib"] for v in VOCABS}
    time_ = {v: by[(v, True)]["seconds_per_step"] / by[(v, False)]["seconds_per_step"] for v in VOCABS}
    mib = 2**20
    text = f"""# LM head memory: whole vs chunked (training pass)

`OMP_NUM_THREADS=1 python benchmarks/head_memory.py`: one forward + backward of `completion_logps` (with the
entropy and token-accuracy statistics SFT asks for) on a random-weight Qwen2 ({LAYERS} layers, hidden {HIDDEN},
untied head) with {ROWS} × {TOKENS:,} = {n:,} trained tokens, float32, CPU, one thread, with `chunked_lm_head`
off and on ({chunk_rows[small]:,}-row chunks at {small:,}, {chunk_rows[large]:,} at {large:,}: a chunk's float32 logits and
softmax stay ≤ 256 MiB). Peak = peak RSS during the step minus RSS just before it (weights
excluded; activations, logits, softmax and gradients included). Each configuration in a fresh process,
{STEPS} step{"s" if STEPS > 1 else ""} each.

| vocab | chunked | head weight (MiB) | peak during the step (MiB) | s/step | Σ logps |
|---|---|---|---|---|---|
{rows}

From {small:,} to {large:,} vocabulary entries the peak grows by **{growth[False]:,} MiB** with the head whole:
N·ΔV·8 B = {n * (large - small) * 8 / mib:,.0f} MiB, the float32 logits and softmax in the forward, the softmax
and the logits' gradient in the backward. Chunked it changes by **{growth[True]:+,} MiB** (the head and embedding
gradients add 2·ΔV·H·4 B = {2 * (large - small) * HIDDEN * 4 / mib:,.0f} MiB; the rest is noise): one chunk's logits and softmax take
rows·V·8 B = {chunk_rows[small] * small * 8 / mib:,.0f} and {chunk_rows[large] * large * 8 / mib:,.0f} MiB at the
two sizes, whatever the number of trained tokens. Chunked / whole: memory **{memory[small]:.2f}×** at {small:,} and **{memory[large]:.2f}×** at
{large:,}; time {time_[small]:.2f}× and {time_[large]:.2f}×: the backward recomputes each chunk's head matmul,
log-sum-exp and softmax (not the entropy or accuracy statistics). With hidden size {HIDDEN} those element-wise
passes over (N, V) cost as much as the matmuls; at real hidden sizes (thousands) the matmuls dominate and the
extra cost tends to one more head forward, about a third of the head's forward + backward. Timed on
2 cores shared with other jobs: seconds varied by up to 40% between repeats of this run, the
memory figures by up to 60 MiB. Σ logps is the same both ways. The default, `auto`, chunks when the (N, V)
float32 softmax would pass 1 GiB: with {n:,} trained tokens, from a vocabulary of {2**30 // (4 * n) + 1:,} up.
"""
    with open(os.path.join(HERE, "HEAD-MEMORY.md"), "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--chunked", choices=["true", "false"])
    opts = parser.parse_args()
    if opts.vocab:
        print(json.dumps(measure(opts.vocab, opts.chunked == "true")))
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    results = []
    for vocab in VOCABS:
        for chunked in ("false", "true"):
            out = subprocess.run([sys.executable, __file__, "--vocab", str(vocab), "--chunked", chunked], env=env,
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    write_report(results)


if __name__ == "__main__":
    main()
