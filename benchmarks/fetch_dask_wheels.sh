#!/usr/bin/env bash
# Downloads dask[distributed] and its dependencies as wheels for Python 3.12 on x86-64
# Linux into wheels/ (ignored by git), for a machine without network access such as the
# device machine, where benchmarks/dask_scaling.sh installs them:
#   bash benchmarks/fetch_dask_wheels.sh
set -euo pipefail
python -m pip download -q --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    -d wheels "dask[distributed]>=2023.1"
ls wheels
