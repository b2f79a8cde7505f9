#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repository root:
#   bash benchmarks/gpu_check.sh [out-dir]
# The core tests with device="auto" (so on CUDA), the GPU-fit / CPU-load round trip,
# and the benchmark for ResNet-18 d=100 and Wide-ResNet-50-2 d=550 at 224 px.
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
python3 -c "import sklearn, torch, torchvision; print('sklearn', sklearn.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_detector.py tests/test_pipeline.py \
    tests/test_features.py tests/test_postprocess.py 2>&1 | tail -15
export PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/run.py --device cuda --n-train 200 --n-test 100 --out "$out"
timeout 240 python3 benchmarks/run.py --device cuda --backbone wide_resnet50_2 --n-features 550 \
    --n-train 200 --n-test 100 --out "$out"
