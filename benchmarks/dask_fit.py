"""Distributed fit on a local Dask cluster versus the single-process fit.

Example (the figures in docs/scale_out.md)::

    python benchmarks/dask_fit.py --n-images 64 --image-size 64 --partition-size 16

Writes ``--n-images`` synthetic PNG textures to a temporary folder, then times, from the
call to a fitted pipeline, in ``--repeats`` interleaved rounds (best and median):

- ``fit_streaming`` in this process, with torch's default thread count and with one
  thread (as in each worker);
- ``Pipeline.fit`` in this process (it also scores the training images for
  ``threshold_``, which the other two do not);
- ``sk_padim.dask.fit_distributed`` on a ``LocalCluster`` of ``--n-workers`` processes
  with one thread each (Dask sets ``OMP_NUM_THREADS=1`` in its workers).

All of them use the same ResNet-18 weights (random values: speed does not
depend on them), so the script also checks that the distributed model equals the local
one. Workers are warmed up (imports, a small fit) before timing. Memory is each process's
peak resident set size (``resource.getrusage``; Linux reports KiB), taken after the runs,
next to its resident size after warm-up. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
import torchvision
from distributed import Client, LocalCluster
from PIL import Image
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming
from sk_padim.dask import fit_distributed


def write_images(folder: str, n: int, size: int, seed: int = 0) -> list[str]:
    """Smooth random RGB textures saved as PNG; returns their paths."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, max(size // 8, 1), max(size // 8, 1), 3), dtype=np.uint8)
    images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f"{index:05d}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def make_pipeline(args, weights_path: str) -> Pipeline:
    feat = PatchFeatureTransformer(
        args.backbone,
        weights=weights_path,
        n_features=args.n_features,
        image_size=args.image_size,
        batch_size=args.batch_size,
        random_state=0,
        device="cpu",
    )
    return Pipeline([("feat", feat), ("padim", PadimDetector(device="cpu"))])


def interleaved_times(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of each run, ``repeats`` rounds that each run every one once.

    Interleaving spreads the load of a shared machine evenly over the runs.
    """
    seconds = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return psutil.Process().memory_info().rss / 2**20, peak_kib / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--partition-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="sk-padim-dask-bench-")
    paths = write_images(folder, args.n_images, args.image_size)
    weights_path = os.path.join(folder, f"{args.backbone}.pth")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(args.backbone, weights=None).state_dict(), weights_path)

    with (
        LocalCluster(
            n_workers=args.n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # shutdown chatter
        ) as cluster,
        Client(cluster) as client,
    ):
        # Warm-up: imports, backbone construction, first-call costs, on both sides.
        fit_distributed(make_pipeline(args, weights_path), paths[:4], client, partition_size=2)
        fit_streaming(make_pipeline(args, weights_path), paths[:4])
        worker_after_warmup = client.run(memory_mib)
        local_after_warmup = memory_mib()

        threads = torch.get_num_threads()

        def streaming(n_threads):
            def run():
                torch.set_num_threads(n_threads)
                try:
                    pipe = make_pipeline(args, weights_path)
                    return fit_streaming(pipe, paths, chunk_size=args.partition_size)
                finally:
                    torch.set_num_threads(threads)

            return run

        runs = {
            "local": streaming(threads),
            "local-1": streaming(1),
            "pipeline": lambda: make_pipeline(args, weights_path).fit(paths),
            "transformer": lambda: make_pipeline(args, weights_path)[0].fit(),
            "distributed": lambda: fit_distributed(
                make_pipeline(args, weights_path), paths, client, partition_size=args.partition_size
            ),
        }
        seconds, results = interleaved_times(runs, args.repeats)
        local, distributed = results["local"], results["distributed"]
        local_memory = memory_mib()
        worker_memory = client.run(memory_mib)

    max_mean_diff = float(np.abs(distributed[-1].mean_ - local[-1].mean_).max())
    max_cov_diff = float(
        np.abs(distributed[-1].packed_covariance_ - local[-1].packed_covariance_).max()
    )
    d, h, w = local[-1].feature_shape_
    partition_mib = args.partition_size * d * h * w * 4 / 2**20
    model_mib = (local[-1].mean_.nbytes + local[-1].packed_covariance_.nbytes) / 2**20
    n_parts = -(-args.n_images // args.partition_size)

    print(
        f"{args.backbone}, d={args.n_features}, {args.image_size} px, {args.n_images} PNG "
        f"images, partitions of {args.partition_size} ({n_parts} tasks, "
        f"{partition_mib:.1f} MiB of features each; model {model_mib:.1f} MiB); "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {platform.python_version()}; "
        f"{args.repeats} interleaved rounds\n"
    )
    print(
        "| fit | processes x threads | seconds, best (median) | images/s, best (median) "
        "| RSS after warm-up | peak RSS |"
    )
    print("|---|---|---|---|---|---|")

    def timing(name):
        best, median = min(seconds[name]), statistics.median(seconds[name])
        n = args.n_images
        return f"{best:.2f} ({median:.2f}) | {n / best:.0f} ({n / median:.0f})"

    local_mem = f"{local_after_warmup[0]:.0f} MiB | {local_memory[1]:.0f} MiB"
    for name, label, n_threads in (
        ("local", "`fit_streaming`, one process", threads),
        ("local-1", "`fit_streaming`, one process", 1),
        ("pipeline", "`Pipeline.fit`, one process (also scores for `threshold_`)", threads),
    ):
        print(f"| {label} | 1 x {n_threads} | {timing(name)} | {local_mem} |")
    per_worker_now = ", ".join(f"{m[0]:.0f}" for m in worker_after_warmup.values())
    per_worker_peak = ", ".join(f"{m[1]:.0f}" for m in worker_memory.values())
    print(
        f"| `fit_distributed`, LocalCluster | {args.n_workers} x 1 | {timing('distributed')} "
        f"| {per_worker_now} MiB | {per_worker_peak} MiB (per worker) |"
    )
    print(
        f"\nOf each fit's time, {min(seconds['transformer']):.2f} s (best) is the "
        "transformer's fit (building the backbone, loading its weights), done once in "
        "this process in all of them."
    )
    print(
        f"Distributed vs local model: max |mean diff| {max_mean_diff:.1e}, "
        f"max |covariance diff| {max_cov_diff:.1e}."
    )


if __name__ == "__main__":
    main()
