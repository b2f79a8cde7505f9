"""Memory over long runs: does peak RSS grow with the number of images?

Each measurement runs in its own process, so its peak resident set size (``ru_maxrss``)
is its own. For each number of images it measures:

- ``score``: a fitted pipeline scores the images in batches (``decision_function`` on
  one batch at a time, as a production line does), batches made on the fly;
- ``score-all``: the same images handed to ``decision_function`` in one array (the
  pipeline then holds every image's features at once: it grows with n by design);
- ``partial_fit``: a detector fitted batch by batch with ``partial_fit`` on the
  transformer's features, batches made on the fly;
- ``fit_streaming``: :func:`sk_padim.fit_streaming` over a list of PNG file paths.

The fit modes then score one batch with the fitted pipeline (the factorisation happens
there) and report the peak after it too.

Peak RSS is read after setup (imports, backbone, fitted model), after the first batch
(everything allocated once) and at the end, and the current RSS at the end; with flat
memory the end figures do not depend on the number of images. (Peaks move by a few tens
of MiB from run to run with the allocator's high-water marks; the current RSS shows
whether anything accumulates.) Example (the figures in
docs/reliability.md)::

    python benchmarks/long_run.py --sizes 500 2000

Weights are random (speed and memory do not depend on them); images are synthetic
textures, 64 px by default. Keep it small on a shared machine: ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

MODES = ("score", "score-all", "partial_fit", "fit_streaming")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def current_rss_mib() -> float | None:
    """Resident set size now, MiB (Linux only: None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def synthetic_batch(start: int, count: int, size: int):
    """Images ``start .. start + count`` of a fixed synthetic sequence, uint8 RGB."""
    import numpy as np

    rng = np.random.default_rng(start)
    coarse = rng.integers(0, 256, (count, size // 8, size // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)


def child(args) -> dict:
    """One measurement, in this process."""
    import numpy as np
    import torch
    from sklearn.pipeline import Pipeline

    from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming

    torch.set_num_threads(args.threads)
    feat = PatchFeatureTransformer(
        backbone=args.backbone,
        weights=None,
        image_size=args.image_size,
        n_features=args.n_features,
        batch_size=args.batch_size,
        random_state=0,
        device="cpu",
    )
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector(device="cpu"))])
    n, batch = args.n_images, args.batch_size
    starts = range(0, n, batch)

    def batch_at(start):
        return synthetic_batch(start, min(batch, n - start), args.image_size)

    after_first = None
    begin = time.perf_counter()
    if args.mode in ("score", "score-all"):
        pipe.fit(synthetic_batch(10**6, 50, args.image_size))
        baseline = peak_rss_mib()
        begin = time.perf_counter()
        if args.mode == "score":
            for start in starts:
                scores = pipe.decision_function(batch_at(start))
                assert np.isfinite(scores).all()
                after_first = after_first or peak_rss_mib()
        else:
            images = np.concatenate([batch_at(start) for start in starts])
            after_first = peak_rss_mib()
            assert np.isfinite(pipe.decision_function(images)).all()
    elif args.mode == "partial_fit":
        feat.fit()
        detector = pipe.named_steps["padim"]
        baseline = peak_rss_mib()
        for start in starts:
            detector.partial_fit(feat.transform(batch_at(start)))
            after_first = after_first or peak_rss_mib()
        assert detector.n_samples_seen_ == n
    else:
        with open(args.paths, encoding="utf-8") as file:
            paths = file.read().split("\n")[:n]
        baseline = peak_rss_mib()
        # fit_streaming transforms chunk by chunk: the second transform starts once the
        # first chunk is folded into the statistics.
        original = PatchFeatureTransformer.transform
        calls = []

        def transform_noting_the_first_chunk(self, X):
            nonlocal after_first
            calls.append(1)
            if len(calls) == 2:
                after_first = after_first or peak_rss_mib()
            return original(self, X)

        PatchFeatureTransformer.transform = transform_noting_the_first_chunk
        fit_streaming(pipe, paths, chunk_size=batch)
        assert pipe.named_steps["padim"].n_samples_seen_ == n
    seconds, peak, now = time.perf_counter() - begin, peak_rss_mib(), current_rss_mib()
    peak_with_scoring = None
    if args.mode in ("partial_fit", "fit_streaming"):  # the model scores (after measuring)
        assert np.isfinite(pipe.decision_function(batch_at(0))).all()
        peak_with_scoring = round(peak_rss_mib(), 1)
    return {
        "mode": args.mode,
        "n_images": n,
        "baseline_mib": round(baseline, 1),
        "after_first_batch_mib": round(after_first, 1),
        "peak_mib": round(peak, 1),
        "rss_at_end_mib": None if now is None else round(now, 1),
        "peak_after_scoring_mib": peak_with_scoring,
        "seconds": round(seconds, 2),
    }


def write_pngs(folder: str, n: int, size: int, batch: int) -> str:
    from PIL import Image

    paths = []
    for start in range(0, n, batch):
        for offset, image in enumerate(synthetic_batch(start, min(batch, n - start), size)):
            paths.append(os.path.join(folder, f"{start + offset:05d}.png"))
            Image.fromarray(image).save(paths[-1])
    list_file = os.path.join(folder, "paths.txt")
    with open(list_file, "w", encoding="utf-8") as file:
        file.write("\n".join(paths))
    return list_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--n-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return

    common = [
        f"--backbone={args.backbone}",
        f"--image-size={args.image_size}",
        f"--n-features={args.n_features}",
        f"--batch-size={args.batch_size}",
        f"--threads={args.threads}",
    ]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        list_file = None
        if "fit_streaming" in args.modes:
            list_file = write_pngs(folder, max(args.sizes), args.image_size, args.batch_size)
        for mode in args.modes:
            for n in args.sizes:
                command = [sys.executable, __file__, f"--child={mode}", f"--n-images={n}", *common]
                if list_file:
                    command.append(f"--paths={list_file}")
                output = subprocess.run(command, check=True, capture_output=True, text=True)
                results.append(json.loads(output.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)

    print(
        f"\nPeak RSS (MiB), {args.backbone} random weights, d={args.n_features}, "
        f"{args.image_size} px, batches of {args.batch_size}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| mode | images | peak after setup | peak after 1st batch | peak at end "
        "| RSS at end | peak after scoring a batch | time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['n_images']} | {r['baseline_mib']} | "
            f"{r['after_first_batch_mib']} | {r['peak_mib']} | {r['rss_at_end_mib']} | "
            f"{r['peak_after_scoring_mib'] or '-'} | {r['seconds']} |"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
