#!/usr/bin/env bash
# The device check of the GPU path, as one prepared run (the `device` tool gives a session ~15 minutes):
# the `gpu`-marked tests, then the GPU benchmark on GPT-2 124M shapes (the numbers issue 10 asks for).
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
echo "== benchmark (GPT-2 124M shapes, bf16, 256 slots)"
timeout 420 "$PY" jobs/benchmark_generate.py --device cuda --preset gpt2-124m --vocab 6800 --batch-size 256 \
    --prompts 1024 --early-prompts 1024 --max-new-tokens 128 --skip-per-prompt 2>&1 | grep -v Warning
