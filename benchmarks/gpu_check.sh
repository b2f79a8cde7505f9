#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repository root:
#   bash benchmarks/gpu_check.sh [out-dir]
# The device benchmark (public Pipeline vs bare backbone from host uint8 arrays) for
# ResNet-18 d=100 and Wide-ResNet-50-2 d=550 at 256 px, then the tests that need CUDA
# and the core tests on CUDA (thread safety included).
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import sklearn, torch, torchvision; print('sklearn', sklearn.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
timeout 120 python3 benchmarks/device_core.py --device cuda --backbone resnet18 --n-features 100 \
    --image-size 256 --n-train 200 --n-test 200 --out "$out"
timeout 180 python3 benchmarks/device_core.py --device cuda --backbone wide_resnet50_2 \
    --n-features 550 --image-size 256 --n-train 200 --n-test 200 --out "$out"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_core.py tests/test_pipeline.py \
    tests/test_persistence.py tests/test_bad_input.py -k "cuda or gpu or GPU or threads or tensor" \
    2>&1 | tail -25
