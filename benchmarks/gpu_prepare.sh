#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), once, before benchmarks/gpu_run.sh goes to the device tool.
#
# The lent GPU machine (nvidia-h200) reaches no registry. Its python3 (3.12) holds torch, accelerate, tokenizers,
# safetensors, pyarrow, pandas, xxhash, fsspec, huggingface_hub, psutil, pyyaml, regex
# (/work/.library/device/KINDS.md) but not TRL or datasets (nor datasets' dill and multiprocess), and its
# transformers (5.17 when last read) is older than the one posttrain is tested with here: posttrain's rollout
# passes the KV cache as `cache=`, the name from transformers 5.2x on, so GRPO fails under 5.17 (seen in a CPU
# simulation of that machine). So this downloads, for Python 3.12, the versions this checkout's .venv runs —
# transformers, peft, TRL, datasets, dill, multiprocess, accelerate and the Hub client with its HTTP stack (the
# image's huggingface_hub 1.33 fails transformers' import-time version check): ~22 MB — into .whl/ (git-ignored),
# which the device call carries and gpu_run.sh installs into /tmp/site:
#
#     bash benchmarks/gpu_prepare.sh
#     device run: command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 600
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in (
    "transformers", "peft", "trl", "datasets", "dill", "multiprocess", "accelerate", "kernels", "tomlkit",
    # transformers checks huggingface-hub >= 2.4 at import (the image had 1.33) and the hub's HTTP stack with it
    "huggingface_hub", "httpx2", "httpcore2", "truststore", "anyio", "idna", "click", "hf-xet", "fsspec", "regex")))
EOF
)
echo "pins: $pins"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls -l .whl
du -sh .whl
git check-ignore -q .whl || echo "warning: .whl/ is not git-ignored; it would travel as untracked files" >&2
