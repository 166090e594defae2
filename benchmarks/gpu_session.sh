#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one device-tool call (~9.5 min): the CUDA tests
# (tests/test_cuda.py), the prepared benchmark on Qwen2-0.5B's shape (gpu_run.sh) and the same on SmolLM2-135M's
# shape (posttrain/shape-smollm2-135m: the real GGUF is 93 MB and cannot travel; speed does not depend on weights).
#
# Here first:  bash benchmarks/gpu_prepare.sh
# Then:        device run  command="bash benchmarks/gpu_session.sh"  carry=[".whl"]  timeout_s=600
# Back in $OUT: pytest.txt, RESULTS-gpu.{md,json}, log.txt, env.txt, smol/RESULTS-gpu.{md,json}, smol/log.txt
# (the device tool returns at most 8 files). QWEN_BUDGET_S (330) and SMOL_BUDGET_S (170, cut to what is left of
# SESSION_BUDGET_S, 575) split the benchmark time.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed (gpu_run.sh retries them one by one)"
{
    PYTHONPATH="$PWD:/tmp/site" POSTTRAIN_CACHE=/tmp/posttrain-test-cache timeout 150 \
        python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA --tb=short 2>&1
    echo "vllm: $(python3 -c 'import vllm; print(vllm.__version__)' 2>&1 | tail -1)"
} > "$OUT/pytest.txt" 2>&1
cat "$OUT/pytest.txt"
GPU_BUDGET_S=${QWEN_BUDGET_S:-330} bash benchmarks/gpu_run.sh > /dev/null
left=$(( ${SESSION_BUDGET_S:-575} - $(date +%s) + START ))  # what the tests and the first benchmark left
smol=${SMOL_BUDGET_S:-170}; (( left < smol )) && smol=$left
(( smol >= 60 )) && OUT="$OUT/smol" BENCH_MODEL=posttrain/shape-smollm2-135m GPU_BUDGET_S=$smol \
    bash benchmarks/gpu_run.sh > /dev/null
rm -f "$OUT/smol/env.txt"
for f in "$OUT/RESULTS-gpu.md" "$OUT/smol/RESULTS-gpu.md"; do [[ -f $f ]] && tail -n 45 "$f"; done; true
