#!/usr/bin/env bash
# The GPU checks of issue 6 in one call (for a machine with CUDA, PyTorch and Triton installed,
# e.g. the device tool's H200 image; nothing is downloaded). From the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the fast-path tests, which also run the compiled (Triton) path on "cuda" when a GPU is
#    present (tests/quant/test_fast_paths.py: same values and gradients as the reference);
# 2. benchmarks/step_time.py on the GPU: float, mixq with the default kernels (the compiled path
#    on CUDA), the eager PyTorch path side by side, LSQ, and the whole step compiled
#    (`compile: true`); ms/step, ratio to float, peak memory, ATen ops and CUDA kernels per step.
#    Expect several minutes: each compiled variant compiles ResNet-20's forward and backward.
set -euo pipefail
out=${1:-${OUT:-/tmp/mixq-gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name(0))" | tee "$out/env.txt"
"$py" -m pytest -q -p no:cacheprovider tests/quant/test_fast_paths.py -k "compiled or agree" \
    2>&1 | tee "$out/tests.txt"
"$py" benchmarks/step_time.py --device cuda --rounds 7 --steps 20 --warmup 10 --markdown \
    --count-ops --variants \
    float,mixq-w,mixq-wa,mixq-p2,mixq-wa-eager,mixq-p2-eager,lsq,float-compile,mixq-wa-compile \
    2>&1 | tee "$out/step_time.md"
