"""Distributed fit and scoring on local Dask clusters of 1, 2, 4, 8 workers versus one process.

Example (the figures in docs/scale_out.md)::

    python benchmarks/dask_fit.py --n-images 64 --image-size 224 --workers 1,2,4,8

Writes ``--n-images`` synthetic PNG textures to a temporary folder. For each worker
count it starts a ``LocalCluster`` of that many processes with one Dask thread each
(``sk_padim.dask`` gives each task the worker's share of the cores in torch threads),
warms it up (imports, a small fit and scoring), then times, in ``--repeats``
interleaved rounds, from the call to the result:

- ``Pipeline.fit`` in this process (torch's default threads: all cores), threshold
  included, and ``sk_padim.dask.fit_distributed`` with its default partitions;
- ``Pipeline.decision_function`` in this process,
  ``sk_padim.dask.score_distributed(...).compute()`` (the model sent with the call) and
  ``DistributedScorer.score(...).compute()`` (the model sent once, before the rounds).

The local runs are repeated next to each cluster's, so every ratio compares runs made
under the same load (the machine may be shared). Also reported: the bytes the workers
sent (to each other and to the client) during one fit and one scoring, from each
worker's ``transfer_outgoing_bytes_total``; the size of the broadcast transformer; the
workers' peak resident memory; and the largest differences between the distributed and
the local model. ``--no-malloc-trim`` starts the workers without the
``MALLOC_TRIM_THRESHOLD_`` that Dask's nannies set; ``--worker-env NAME=VALUE`` adds a
variable to the workers' environment (e.g. ``THP_MEM_ALLOC_ENABLE=1``, see
docs/scale_out.md). All use the same backbone weights
(random values: speed does not depend on them). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import platform
import resource
import statistics
import tempfile
import time

import dask
import numpy as np
import torch
import torchvision
from dask.system import CPU_COUNT
from distributed import Client, LocalCluster
from PIL import Image
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.dask import DistributedScorer, fit_distributed, score_distributed


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


def bytes_sent(dask_worker) -> int:
    """Bytes this worker has sent to other workers and clients since it started."""
    return dask_worker.transfer_outgoing_bytes_total


def sent_during(client: Client, run) -> tuple[object, list[int]]:
    """``run()``'s result and the bytes each worker sent meanwhile."""
    before = client.run(bytes_sent)
    result = run()
    after = client.run(bytes_sent)
    return result, [after[address] - before[address] for address in sorted(after)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--no-malloc-trim",
        action="store_true",
        help="start workers without Dask's MALLOC_TRIM_THRESHOLD_=65536 (see docs/scale_out.md)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the workers, e.g. THP_MEM_ALLOC_ENABLE=1",
    )
    args = parser.parse_args()
    if args.no_malloc_trim:
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    for setting in args.worker_env:
        name, _, value = setting.partition("=")
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value})
    worker_counts = [int(count) for count in args.workers.split(",")]

    folder = tempfile.mkdtemp(prefix="sk-padim-dask-bench-")
    paths = write_images(folder, args.n_images, args.image_size)
    weights_path = os.path.join(folder, f"{args.backbone}.pth")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(args.backbone, weights=None).state_dict(), weights_path)
    fitted = make_pipeline(args, weights_path).fit(paths)  # also the local warm-up
    n = args.n_images

    rows, traffic, checks = [], [], []
    for n_workers in worker_counts:
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.CRITICAL,  # shutdown chatter
            ) as cluster,
            Client(cluster) as client,
        ):
            warm = make_pipeline(args, weights_path)
            fit_distributed(warm, paths[: 2 * n_workers], client)
            score_distributed(warm, paths[: 2 * n_workers], client).compute()
            kept = DistributedScorer(fitted, client)
            kept.score(paths[: 2 * n_workers]).compute()
            runs = {
                "local fit": lambda: make_pipeline(args, weights_path).fit(paths),
                "distributed fit": lambda: fit_distributed(
                    make_pipeline(args, weights_path), paths, client
                ),
                "local scoring": lambda: fitted.decision_function(paths),
                "distributed scoring": lambda: score_distributed(fitted, paths, client).compute(),
                "kept scoring": lambda scorer=kept: scorer.score(paths).compute(),
            }
            seconds, results = interleaved_times(runs, args.repeats)
            distributed, fit_bytes = sent_during(
                client, lambda: fit_distributed(make_pipeline(args, weights_path), paths, client)
            )
            _, score_bytes = sent_during(
                client, lambda: score_distributed(fitted, paths, client).compute()
            )
            kept.close()
            peak = max(memory[1] for memory in client.run(memory_mib).values())
        median = {name: statistics.median(times) for name, times in seconds.items()}
        rows.append((n_workers, median, peak))
        traffic.append((n_workers, fit_bytes, score_bytes))
        local, remote = results["local fit"][-1], distributed[-1]
        local_stats, remote_stats = local.statistics_, remote.statistics_
        checks.append(
            (
                n_workers,
                float((remote_stats.mean - local_stats.mean).abs().max()),
                float(
                    (remote_stats.covariance(slice(None)) - local_stats.covariance(slice(None)))
                    .abs()
                    .max()
                ),
                abs(remote.threshold_ - local.threshold_) / local.threshold_,
                float(np.abs(results["distributed scoring"] - results["local scoring"]).max()),
            )
        )

    d, h, w = fitted[-1].feature_shape_
    model_mib = sum(array.nbytes for array in fitted[-1].fitted_state()[0].values()) / 2**20
    feat_mib = len(pickle.dumps(fitted[0])) / 2**20
    print(
        f"{args.backbone}, d={args.n_features}, {args.image_size} px, {n} PNG images "
        f"(features {d * h * w * 4 / 2**20:.2f} MiB per image; model {model_mib:.1f} MiB, "
        f"pickled transformer {feat_mib:.1f} MiB); {CPU_COUNT} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads in this process), Python "
        f"{platform.python_version()}; median of {args.repeats} interleaved rounds per row; "
        f"workers' environment: {dask.config.get('distributed.nanny.pre-spawn-environ')}\n"
    )
    print(
        "| workers x 1 Dask thread | local fit img/s | distributed fit img/s | ratio "
        "| local scoring img/s | distributed scoring img/s | ratio "
        "| DistributedScorer img/s | ratio | worker peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_workers, median, peak in rows:
        fit_local, fit_remote = n / median["local fit"], n / median["distributed fit"]
        score_local, score_remote = n / median["local scoring"], n / median["distributed scoring"]
        score_kept = n / median["kept scoring"]
        print(
            f"| {n_workers} | {fit_local:.1f} | {fit_remote:.1f} | {fit_remote / fit_local:.2f} "
            f"| {score_local:.1f} | {score_remote:.1f} | {score_remote / score_local:.2f} "
            f"| {score_kept:.1f} | {score_kept / score_local:.2f} | {peak:.0f} MiB |"
        )
    fit_1 = n / rows[0][1]["distributed fit"]
    for n_workers, median, _ in rows[1:]:
        efficiency = n / median["distributed fit"] / (fit_1 * n_workers / rows[0][0])
        print(f"\nFit scaling efficiency {rows[0][0]} -> {n_workers} workers: {efficiency:.0%}")
    print("\n| workers | MiB sent per worker during a fit | during a scoring |\n|---:|---|---|")
    for n_workers, fit_bytes, score_bytes in traffic:
        print(
            f"| {n_workers} | {', '.join(f'{b / 2**20:.1f}' for b in fit_bytes)} "
            f"| {', '.join(f'{b / 2**20:.2f}' for b in score_bytes)} |"
        )
    print(
        "\n| workers | max abs mean diff | max abs covariance diff | threshold rel. diff "
        "| max abs score diff |\n|---:|---:|---:|---:|---:|"
    )
    for n_workers, mean_diff, cov_diff, threshold_diff, score_diff in checks:
        print(
            f"| {n_workers} | {mean_diff:.1e} | {cov_diff:.1e} | {threshold_diff:.1e} "
            f"| {score_diff:.1e} |"
        )


if __name__ == "__main__":
    main()
