#!/usr/bin/env bash
# Dask scaling on a machine with many cores (docs/scale_out.md: 1, 2, 4, 8 workers against
# a local fit, ResNet-18, d=100, 384 PNG images at 224 px, CPU only), run from the
# repository root with the wheels of benchmarks/fetch_dask_wheels.sh in wheels/:
#   bash benchmarks/dask_scaling.sh [out-dir]
# On the device machine: run(command="bash benchmarks/dask_scaling.sh $OUT", carry=["wheels"]).
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links wheels "dask[distributed]" 2>&1 | tail -2
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
python3 -c "import os, dask, torch; print('cores', os.cpu_count(), 'dask', dask.__version__, 'torch', torch.__version__)"
timeout 520 python3 benchmarks/dask_fit.py --n-images 384 --image-size 224 \
    --workers 1,2,4,8 --repeats 2 2>&1 | tee "$out/dask_scaling.md"
