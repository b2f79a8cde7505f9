"""A grid search over n_features and layer sets with and without the transformer's memory.

Example (the figures in docs/evaluation.md)::

    python benchmarks/grid_search.py --image-size 224 --n-images 60

The grid: ``n_features`` in {25, 50, 100} x layer sets {layer1-3, layer1-2} of
ResNet-18, ``NormalTrainSplit(n_splits=3)``, scored by pixel AUROC, refit included. It
runs without memory, then with ``PatchFeatureTransformer(memory=folder)`` into an empty
folder (so the backbone's one pass over the images is part of its time), and then one
``cross_validate`` of the largest candidate (d=100, layer1-3) without memory, for scale.
The best parameters and every test score must be equal between the two grids. A third
grid, with memory and a fixed ``threshold`` for the detector, shows the cost of the
leave-one-out pass by which each fit sets its default ``threshold_`` (pixel AUROC never
uses it; the refit then keeps the fixed threshold, so this is a measurement, not a
recipe).

Then, to show what the cached grid spends its time on, one fold of the largest candidate
stage by stage, the cache warm: the transformer's fit, its transform of the training and
of the test images, the detector's fit (statistics, factorisation, leave-one-out
threshold), its scoring and the pixel AUROC. And the cache's disk use per image (a
folder's bytes after transforming images with ResNet-18 and Wide-ResNet-50-2's default
layers).

Images are the deterministic synthetic textures of ``benchmarks/run.py`` (half with a
pasted square of stripes and its mask). Weights are random by default (``--weights
none``): speed does not depend on their values. The machine may be shared: compare
figures within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import synthetic_images
from run import with_defects
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import Pipeline

from sk_padim import (
    NormalTrainSplit,
    PadimDetector,
    PatchFeatureTransformer,
    pixel_auroc,
    pixel_auroc_scorer,
)

LAYER_SETS = [("layer1", "layer2", "layer3"), ("layer1", "layer2")]  # largest first
N_FEATURES = [25, 50, 100]


def pipeline(args, memory=None, threshold=None) -> Pipeline:
    weights = None if args.weights == "none" else args.weights
    feat = PatchFeatureTransformer(
        weights=weights,
        image_size=args.image_size,
        random_state=0,
        memory=memory,
        precision=args.precision,
        runtime=args.runtime,
    )
    return Pipeline([("feat", feat), ("padim", PadimDetector(threshold=threshold))])


def grid_search(pipe, args) -> tuple[GridSearchCV, float]:
    search = GridSearchCV(
        pipe,
        {"feat__layers": LAYER_SETS, "feat__n_features": N_FEATURES},
        scoring=pixel_auroc_scorer,
        cv=NormalTrainSplit(n_splits=3),
        n_jobs=args.n_jobs,
    )
    start = time.perf_counter()
    search.fit(args.X, args.masks)
    return search, time.perf_counter() - start


def folder_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def bytes_per_image(backbone: str, size: int, n_images: int = 2) -> float:
    """Disk use of the cache per image for a backbone's default layers."""
    images = synthetic_images(n_images, size, seed=3)
    with tempfile.TemporaryDirectory() as folder:
        feat = PatchFeatureTransformer(backbone, weights=None, image_size=size, memory=folder)
        feat.fit().transform(images)
        return folder_bytes(folder) / n_images


def stages(pipe, args) -> dict[str, float]:
    """Seconds of each stage of one fold of a candidate (its cache, if any, warm)."""
    train, test = next(NormalTrainSplit(n_splits=3).split(args.X, args.masks))
    feat, detector = clone(pipe.named_steps["feat"]), clone(pipe.named_steps["padim"])
    seconds = {}

    def timed(name, call):
        start = time.perf_counter()
        result = call()
        seconds[name] = time.perf_counter() - start
        return result

    timed("transformer fit", feat.fit)
    train_features = timed("transform (training fold)", lambda: feat.transform(args.X[train]))
    timed("detector fit", lambda: detector.fit(train_features))
    test_features = timed("transform (test fold)", lambda: feat.transform(args.X[test]))
    maps = timed("detector scoring", lambda: detector.score_samples(test_features))
    timed("pixel AUROC", lambda: pixel_auroc(args.masks[test], maps))
    return seconds


def run(args) -> dict:
    images = synthetic_images(args.n_images, args.image_size, seed=0)
    args.X, _, args.masks = with_defects(images, seed=1)
    plain, plain_seconds = grid_search(pipeline(args), args)
    with tempfile.TemporaryDirectory() as folder:
        cached, cached_seconds = grid_search(pipeline(args, memory=folder), args)
        cache_bytes = folder_bytes(folder)
        fixed, fixed_seconds = grid_search(pipeline(args, folder, threshold=0.0), args)
        largest = pipeline(args).set_params(feat__n_features=100)
        start = time.perf_counter()
        cross_validate(
            largest, args.X, args.masks, scoring=pixel_auroc_scorer, cv=NormalTrainSplit(3)
        )
        cv_seconds = time.perf_counter() - start
        stage_seconds = {
            "without memory": stages(largest, args),
            "with memory (warm)": stages(largest.set_params(feat__memory=folder), args),
        }
    scores = [key for key in plain.cv_results_ if "test_score" in key]
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "n_images": args.n_images,
        "image_size": args.image_size,
        "n_jobs": args.n_jobs,
        "precision": args.precision,
        "runtime": args.runtime,
        "grid_seconds_without_memory": plain_seconds,
        "grid_seconds_with_memory": cached_seconds,
        "grid_seconds_with_memory_fixed_threshold": fixed_seconds,
        "cross_validate_seconds_largest": cv_seconds,
        "best_params_equal": cached.best_params_ == plain.best_params_,
        "scores_equal": all(
            np.array_equal(plain.cv_results_[k], search.cv_results_[k])
            for k in scores
            for search in (cached, fixed)
        ),
        "best_params": {k: str(v) for k, v in plain.best_params_.items()},
        "mean_test_scores": plain.cv_results_["mean_test_score"].tolist(),
        "cache_bytes_per_image_grid": cache_bytes / args.n_images,
        "cache_bytes_per_image_224": {
            name: bytes_per_image(name, 224) for name in ("resnet18", "wide_resnet50_2")
        },
        "stage_seconds": stage_seconds,
    }


def markdown(result: dict) -> str:
    plain = result["grid_seconds_without_memory"]
    cached = result["grid_seconds_with_memory"]
    fixed = result["grid_seconds_with_memory_fixed_threshold"]
    per_image = result["cache_bytes_per_image_224"]
    lines = [
        f"ResNet-18, {result['image_size']} px, {result['n_images']} images, "
        f"d in {N_FEATURES} x {len(LAYER_SETS)} layer sets, NormalTrainSplit(3), "
        f"pixel AUROC, n_jobs={result['n_jobs']}, backbone {result['precision']} "
        f"{result['runtime']}; {result['machine']['cores']} cores, "
        f"{result['machine']['torch_threads']} torch threads",
        "",
        "| | seconds | x grid without memory |",
        "|---|---:|---:|",
        f"| grid search without memory | {plain:.1f} | 1.00 |",
        f"| grid search with memory (empty cache) | {cached:.1f} | {cached / plain:.2f} |",
        f"| same, warm cache, fixed threshold (no leave-one-out pass) | {fixed:.1f} | "
        f"{fixed / plain:.2f} |",
        f"| one cross_validate of d=100, layer1-3 | "
        f"{result['cross_validate_seconds_largest']:.1f} | "
        f"{result['cross_validate_seconds_largest'] / plain:.2f} |",
        "",
        f"best_params_ equal: {result['best_params_equal']}; "
        f"cv_results_ test scores equal (all three grids): {result['scores_equal']}; "
        f"best: {result['best_params']}",
        "",
        f"Cache on disk per image: {result['cache_bytes_per_image_grid'] / 1e6:.2f} MB in the "
        f"grid (layer1-3); at 224 px, ResNet-18 {per_image['resnet18'] / 1e6:.2f} MB, "
        f"Wide-ResNet-50-2 {per_image['wide_resnet50_2'] / 1e6:.2f} MB.",
        "",
        "One fold of d=100, layer1-3, stage by stage (seconds):",
        "",
        "| stage | without memory | with memory (warm) |",
        "|---|---:|---:|",
    ]
    without, warm = result["stage_seconds"].values()
    lines += [f"| {stage} | {without[stage]:.2f} | {warm[stage]:.2f} |" for stage in without]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-images", type=int, default=60)
    parser.add_argument("--weights", default="none", help="'none', a name or a file")
    parser.add_argument("--n-jobs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--out", default="", help="also write the table and JSON here")
    parser.add_argument("--precision", default="float32", help="the transformer's precision")
    parser.add_argument("--runtime", default="eager", help="the transformer's runtime")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"grid_search_{args.image_size}" + (
            "" if args.runtime == "eager" else f"_{args.runtime}"
        )
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
