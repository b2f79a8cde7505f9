"""The distance kernel alone: ``PatchGaussians`` on random factors, by images per call.

Example (the kernel figures of docs/high_resolution.md; run a revision before and after a
change side by side, each on an idle machine)::

    python benchmarks/distance_kernel.py --grid 512 --d 100 --batches 1 2 4 8
    PYTHONPATH=<checkout of another revision> python benchmarks/distance_kernel.py ...

A ``--grid`` of 512 is the feature grid of a 2048 x 2048 image at stride 4 (262,144
positions, 5.3 GB of packed factors at ``d=100``). Factors and features are random
(the kernel's time does not depend on their values). Times are the median of
``--repeats`` calls after a warm-up call, per call and per image, on the CPU with torch's
default threads. Only ``PatchGaussians(mean, packed_factor)`` and its call are used, so
the script runs on any revision that has them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sk_padim.core.mahalanobis import PatchGaussians


def seconds_per_call(gaussians: PatchGaussians, features: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        gaussians(features)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gaussians(features)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=512, help="feature grid side (h = w)")
    parser.add_argument("--d", type=int, default=100, help="features per position")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    n_positions, width = args.grid * args.grid, args.d * (args.d + 1) // 2
    mean = torch.randn(n_positions, args.d, generator=generator, dtype=torch.float64)
    packed = torch.randn(n_positions, width, generator=generator) * 0.1
    gaussians = PatchGaussians(mean, packed)
    print(f"grid {args.grid} x {args.grid}, d={args.d}, {torch.get_num_threads()} threads\n")
    print("| images per call | s/call | s/image |\n|---:|---:|---:|")
    for batch in args.batches:
        features = torch.randn(batch, args.d, args.grid, args.grid, generator=generator)
        seconds = seconds_per_call(gaussians, features, args.repeats)
        print(f"| {batch} | {seconds:.2f} | {seconds / batch:.3f} |", flush=True)


if __name__ == "__main__":
    main()
