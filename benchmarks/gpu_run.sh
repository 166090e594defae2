#!/usr/bin/env bash
# The GPU benchmark in one device-tool call: posttrain vs TRL (defaults; best = bf16 without gradient
# checkpointing) vs the plain PyTorch loop, SFT, DPO and GRPO, on Qwen2-0.5B's shape with random weights
# (posttrain/shape-qwen2-0.5b, built on the machine: nothing is downloaded), reporting MFU. About 7–8 minutes.
#
# Here, first (PyPI is reachable here, not there):   bash benchmarks/gpu_prepare.sh      (wheels into .whl/)
# Then the device tool:   run  command="bash benchmarks/gpu_run.sh"  carry=[".whl"]  timeout_s=600
# Back in $OUT (files_at): RESULTS-gpu.md, RESULTS-gpu.json (compare_trl.py's report and store), log.txt
# (everything printed), env.txt (versions, nvidia-smi). Copy RESULTS-gpu.* into benchmarks/ to keep them; rerender
# with `python benchmarks/compare_trl.py --report_only --out benchmarks/RESULTS-gpu.md`.
#
# Each task is its own compare_trl.py invocation under its own time limit, writing into the same store, and
# compare_trl.py saves the store after every run, so whatever finished comes back even if a later part fails or the
# whole call is cut off. GPU_BUDGET_S (default 480) sets the overall budget in seconds, TASKS the tasks
# (default "sft dpo grpo"; reward and kto also work). BENCH_DEVICE, BENCH_MODEL, BENCH_WORKLOAD and BENCH_EXTRA
# replace the device, the model, the workload flags and add flags: a dry run of this script on a CPU, e.g.
#     OUT=/tmp/dry BENCH_DEVICE=cpu BENCH_MODEL=posttrain/tiny-15m PY=.venv/bin/python BENCH_EXTRA="--threads 1" \
#     BENCH_WORKLOAD="--batch 2 --min_tokens 16 --max_tokens 32 --grpo_prompts 1 --generations 4 --max_new_tokens 16 \
#     --steps 2" bash benchmarks/gpu_run.sh
set -uo pipefail  # no -e: one failing task must not lose the others; each step checks what it needs

OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-480}
TASKS=${TASKS:-"sft dpo grpo"}
PY=${PY:-python3}  # on the device image, the python3 that holds PyTorch (CUDA build)
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
BENCH_MODEL=${BENCH_MODEL:-posttrain/shape-qwen2-0.5b}
# Batch 16 rows, prompts and completions 128–384 tokens (≤ 769-token sequences: max_length 1024 cuts nothing),
# GRPO 4 prompts × 8 completions of ≤ 128 new tokens, 6 steps per run (median of steps 2–6), one repeat.
BENCH_WORKLOAD=${BENCH_WORKLOAD:-"--batch 16 --min_tokens 128 --max_tokens 384 --grpo_prompts 4 --generations 8 \
--max_new_tokens 128 --steps 6"}
BENCH_EXTRA=${BENCH_EXTRA:-}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export POSTTRAIN_CACHE=/tmp/posttrain-cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# transformers 5.2x with `kernels` installed turns Hub kernels on by default and fetches them at the first train() on a
# GPU: offline that fails for every variant, the plain loop included (seen on the H200). Off for all of them.
export USE_HUB_KERNELS=NO
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed) s] $*"; }

main() {

# ---- packages: the carried wheels (gpu_prepare.sh) over the image's own --------------------------------------
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl | tr '\n' ' ')"
    PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    if ! "${PIP[@]}" .whl/*.whl; then  # one bad wheel fails them all: then each on its own
        say "installing the wheels together failed; one by one"
        for whl in .whl/*.whl; do "${PIP[@]}" "$whl" || say "could not install $whl"; done
    fi
else
    say "no .whl/ carried (run benchmarks/gpu_prepare.sh here and carry .whl): using the image's packages alone"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "date: $(date -u)"; echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?')"
    nvidia-smi 2>&1 | head -20
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers", "huggingface_hub",
             "safetensors", "pyarrow", "numpy", "psutil"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, transformers, trl, datasets, posttrain
assert '$BENCH_DEVICE' != 'cuda' or torch.cuda.is_available(), 'torch sees no GPU'"; then
    say "the harness cannot run here (import or GPU check above failed): stopping"
    return 1
fi

# ---- the model, built once (0.5B: 2 GB of random fp32 weights; every run then loads it from the cache) ---------
say "building $BENCH_MODEL"
"$PY" -c "from posttrain.models.builtin import builtin_model_path as p; print(p('$BENCH_MODEL'))" \
    || { say "model build failed: stopping"; return 1; }

# ---- the harness, one task at a time ----------------------------------------------------------------------------
# shellcheck disable=SC2206
COMMON=(--device "$BENCH_DEVICE" --model "$BENCH_MODEL" $BENCH_WORKLOAD --repeats 1 --fail_lines 25
        --out "$OUT/RESULTS-gpu.md" $BENCH_EXTRA)
# Each task gets its share of the time left when it starts (time a task leaves unused passes to the next); one run
# may take 1.6× its even part of the task's time (a slow TRL run is not cut at once; the task's own limit still
# holds, and every run finished by then is kept).
declare -A SHARE=([sft]=25 [dpo]=30 [grpo]=45 [reward]=20 [kto]=25)
declare -A RUNS=([sft]=4 [dpo]=4 [grpo]=3 [reward]=4 [kto]=3)
left_tasks=($TASKS)
for task in $TASKS; do
    left=$(( BUDGET - $(elapsed) - 15 ))  # 15 s kept for the final report
    if (( left < 60 )); then say "skipping $task: ${left} s left"; left_tasks=("${left_tasks[@]:1}"); continue; fi
    total=0; for t in "${left_tasks[@]}"; do total=$(( total + ${SHARE[$t]:-25} )); done
    limit=$(( left * ${SHARE[$task]:-25} / total ))
    (( ${#left_tasks[@]} == 1 )) && limit=$left
    per_run=$(( limit * 16 / (10 * ${RUNS[$task]:-4}) ))
    say "task $task: ${limit} s for the task, ${per_run} s per run"
    timeout --signal=TERM --kill-after=10 "$limit" \
        "$PY" benchmarks/compare_trl.py "${COMMON[@]}" --tasks "$task" --run_timeout "$per_run"
    rc=$?
    (( rc != 0 )) && say "task $task ended with rc=$rc (124: its time limit); its finished runs are in the store"
    left_tasks=("${left_tasks[@]:1}")
done

# ---- the report from whatever the store holds (also after a cut-off task) ---------------------------------------
if [[ -f "$OUT/RESULTS-gpu.json" ]]; then
    "$PY" benchmarks/compare_trl.py --report_only --out "$OUT/RESULTS-gpu.md" >/dev/null \
        && say "wrote $OUT/RESULTS-gpu.md" && cat "$OUT/RESULTS-gpu.md"
else
    say "no results were stored"
fi
say "done"
}

main 2>&1 | tee -a "$OUT/log.txt"
