"""Speed and memory of the PaDiM pipeline, stage by stage.

Example (the figures in docs/performance.md)::

    python benchmarks/run.py --backbone resnet18 --n-features 100 --image-size 224 \
        --n-train 200 --n-test 100

Images are deterministic synthetic textures already in memory (uint8); half of the test
images carry a pasted square of stripes, with its mask, so that the run also reports
image and pixel AUROC, and their change with ``covariance_dtype="float16"``. Weights are
random (``--weights none``, the default) since speed does not depend on their values.

The reference, "bare truncated backbone", is torchvision's model cut after the deepest
layer, as it comes; the pipeline's own backbone also has its batch norms folded into the
convolutions, and the ratios to it show PaDiM's own cost. Throughputs are medians over
``--repeats`` measurements, the backbones and the pipeline alternating, so that a passing
disturbance moves all of them. ``--under-load`` measures scoring again while a busy loop
holds one core in another process; ``--file-size 1024`` also scores the test images from
PNG files of that size (MVTec AD's are 700-1024 px), whose decoding overlaps with the
backbone. The script prints a Markdown table and writes it, with the raw numbers as
JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import joblib
import numpy as np
import torch
from bench_data import synthetic_images
from PIL import Image
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer, image_auroc, pixel_auroc
from sk_padim.core.backbones import TruncatedBackbone, load_backbone
from sk_padim.core.devices import resolve_device
from sk_padim.core.images import iter_batches
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.model import PatchScorer
from sk_padim.core.postprocess import AnomalyMapGenerator
from sk_padim.core.statistics import PatchStatistics


def with_defects(images: np.ndarray, seed: int):
    """Paste a square of fine stripes into every other image: (images, labels, masks).

    Stripes two pixels wide are a texture the blocky training images never show, so
    that even random backbone weights find them (image AUROC about 0.9).
    """
    rng = np.random.default_rng(seed)
    images = images.copy()
    n, size = images.shape[:2]
    side = size // 6
    stripes = (np.arange(side) // 2 % 2 * 255).astype(np.uint8)[:, None, None]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n, 2):
        top, left = rng.integers(0, size - side, size=2)
        masks[i, top : top + side, left : left + side] = True
        images[i, top : top + side, left : left + side] = stripes
    return images, masks.any(axis=(1, 2)).astype(int), masks


class StageTimer:
    """Accumulates wall-clock seconds per named stage (synchronising CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _staged_features(feat, images, phase, timer):
    """Yield feature batches, timing decoding, the backbone and assembly."""
    device = resolve_device(feat.device)
    embedding = feat.to_module(device)
    batches = iter_batches(images, feat.image_size_, feat.batch_size)
    while True:
        with timer(f"{phase}: decode + resize"):
            batch = next(batches, None)
            if batch is not None:
                pixels = embedding.normalise(batch.to(device))
                pixels = pixels.contiguous(memory_format=torch.channels_last)
        if batch is None:
            return
        with torch.inference_mode():
            with timer(f"{phase}: backbone forward"):
                layer_maps = embedding.backbone(pixels)
            with timer(f"{phase}: feature assembly"):
                features = embedding.assemble(layer_maps)
        yield features


def staged_fit(feat, detector, images, timer) -> PatchGaussians:
    """The fit path through the library's stages; returns the fitted Gaussians."""
    d, h, w = feat.feature_shape_
    device = resolve_device(feat.device)
    stats = PatchStatistics.empty(h * w, d, device)
    for features in _staged_features(feat, images, "fit", timer):
        with torch.inference_mode(), timer("fit: statistics update"):
            stats.update(features)
    with timer("fit: factorisation"):
        return stats.gaussians(detector.reg)


def staged_score(feat, detector, images, gaussians, timer):
    """The scoring path through the library's stages."""
    d, h, w = feat.feature_shape_
    generator = AnomalyMapGenerator((h, w), (4 * h, 4 * w), detector.sigma, detector.truncate)
    scorer = PatchScorer(gaussians, generator.to(resolve_device(feat.device)))
    for features in _staged_features(feat, images, "score", timer):
        with torch.inference_mode():
            with timer("score: distance kernel"):
                distances = scorer.gaussians(features)
            with timer("score: upsample + blur + image score"):
                scorer.maps_of_distances(distances)[1].cpu()


def reference_backbone(feat, args, device) -> torch.nn.Module:
    """torchvision's backbone truncated after the deepest layer, batch norms not folded."""
    weights = None if args.weights == "none" else args.weights
    model = load_backbone(args.backbone, weights, init_seed=0)
    probe = torch.zeros(1, 3, *feat.image_size_)
    truncated = TruncatedBackbone(model, feat.layers_, probe)
    return truncated.to(device, memory_format=torch.channels_last)


def backbone_seconds(model, batches) -> float:
    """Seconds for a truncated backbone alone on preprocessed batches."""
    timer = StageTimer(batches[0].device)
    with torch.inference_mode(), timer("backbone"):
        for batch in batches:
            model(batch)
    return timer.seconds["backbone"]


def seconds_of(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def fit_seconds(pipe, train) -> float:
    """Pipeline ``fit``: statistics, factorisation and the default threshold."""
    return seconds_of(lambda: pipe.fit(train))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_sizes_mb(pipe) -> tuple[float, float]:
    arrays = pipe.named_steps["padim"].fitted_state()[0].values()
    params = pipe.named_steps["feat"].backbone_.parameters()
    in_memory = sum(a.nbytes for a in arrays) + sum(p.numel() * 4 for p in params)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.joblib")
        joblib.dump(pipe, path)
        on_disk = os.path.getsize(path)
    return in_memory / 2**20, on_disk / 2**20


def float16_copy(pipe) -> Pipeline:
    """The pipeline with ``covariance_dtype="float16"``: what its ``fit`` would store."""
    detector = pipe.named_steps["padim"]
    params = {**detector.get_params(), "covariance_dtype": "float16"}
    params["threshold"] = detector.threshold_
    half = PadimDetector.from_statistics(detector.statistics_, detector.feature_shape_, **params)
    return Pipeline([pipe.steps[0], ("padim", half)])


def accuracy(pipe, test, labels, masks) -> dict:
    maps = pipe.score_samples(test)
    scores = maps.max(axis=(1, 2))
    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps)}


@contextmanager
def busy_loop():
    """Another process spinning on one core for the duration."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def write_pngs(images: np.ndarray, size: int, folder: str) -> list[str]:
    """The images resized to ``size`` px and written as PNG files; their paths."""
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        Image.fromarray(image).resize((size, size), Image.BILINEAR).save(paths[-1])
    return paths


def file_figures(feat, pipe, test, args) -> dict:
    """Scoring from PNG files, and the decoding alone (nothing to overlap it with)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = write_pngs(test, args.file_size, folder)
        batches = iter_batches(paths, feat.image_size_, feat.batch_size)
        decode_s = seconds_of(lambda: sum(1 for _ in batches))
        rates = [
            len(paths) / seconds_of(lambda: pipe.decision_function(paths))
            for _ in range(args.repeats)
        ]
    return {
        "file_size": args.file_size,
        "decode_ms_per_image": 1000 * decode_s / len(paths),
        "score_images_per_s": statistics.median(rates),
    }


def throughputs(backbones, pipe, test, batches, repeats) -> list[float]:
    """Median images/s of each backbone alone and of pipeline scoring, alternating."""
    rates = []
    for _ in range(repeats):
        rates.append([len(test) / backbone_seconds(model, batches) for model in backbones])
        rates[-1].append(len(test) / seconds_of(lambda: pipe.decision_function(test)))
    return [statistics.median(column) for column in zip(*rates, strict=True)]


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    feat = PatchFeatureTransformer(
        backbone=args.backbone,
        weights=None if args.weights == "none" else args.weights,
        n_features=args.n_features,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        random_state=0,
    )
    detector = PadimDetector(batch_size=args.batch_size, device=args.device)
    pipe = Pipeline([("feat", feat), ("padim", detector)])
    train = synthetic_images(args.n_train, args.image_size, seed=0)
    test, labels, masks = with_defects(synthetic_images(args.n_test, args.image_size, 1), 2)
    feat.fit()
    embedding = feat.to_module(device)
    batches = [
        embedding.normalise(b.to(device)).contiguous(memory_format=torch.channels_last)
        for b in iter_batches(test, feat.image_size_, feat.batch_size)
    ]
    backbones = (reference_backbone(feat, args, device), embedding.backbone)
    for model in backbones:  # warm-up: kernel selection, allocator, caches
        backbone_seconds(model, batches[:1])

    timer = StageTimer(device)
    gaussians = staged_fit(feat, detector, train, timer)
    staged_score(feat, detector, test, gaussians, timer)
    del gaussians

    fit_rate = statistics.median(
        args.n_train / fit_seconds(pipe, train) for _ in range(args.repeats)
    )
    backbone_rate, folded_rate, score_rate = throughputs(
        backbones, pipe, test, batches, args.repeats
    )
    loaded = None
    if args.under_load:
        with busy_loop():
            loaded = throughputs(backbones[:1], pipe, test, batches, args.repeats)
    files = file_figures(feat, pipe, test, args) if args.file_size else None
    full = accuracy(pipe, test, labels, masks)
    half = float16_copy(pipe)
    half_accuracy = accuracy(half, test, labels, masks)
    in_memory_mb, joblib_mb = model_sizes_mb(pipe)
    return {
        "config": vars(args),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
        "stages_ms_per_image": {
            stage: 1000 * seconds / (args.n_train if stage.startswith("fit") else args.n_test)
            for stage, seconds in timer.seconds.items()
        },
        "fit_images_per_s": fit_rate,
        "score_images_per_s": score_rate,
        "bare_backbone_images_per_s": backbone_rate,
        "folded_backbone_images_per_s": folded_rate,
        "score_to_backbone_ratio": score_rate / backbone_rate,
        "fit_to_backbone_ratio": fit_rate / backbone_rate,
        "score_to_folded_backbone_ratio": score_rate / folded_rate,
        "fit_to_folded_backbone_ratio": fit_rate / folded_rate,
        "under_load": None
        if loaded is None
        else {
            "bare_backbone_images_per_s": loaded[0],
            "score_images_per_s": loaded[1],
            "score_to_idle_score_ratio": loaded[1] / score_rate,
            "backbone_to_idle_backbone_ratio": loaded[0] / backbone_rate,
        },
        "from_files": files,
        "accuracy": {"float32": full, "float16": half_accuracy},
        "peak_rss_mb": peak_rss_mb(),
        "model_mb_in_memory": in_memory_mb,
        "model_mb_joblib": joblib_mb,
        "model_mb_joblib_float16": model_sizes_mb(half)[1],
    }


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"### {c['backbone']}, d={c['n_features']}, {c['image_size']} px, "
        f"batch {c['batch_size']}, {result['machine']['device']}, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']}",
        "",
        "| stage | ms / image | share of its phase |",
        "|---|---:|---:|",
    ]
    stages = result["stages_ms_per_image"]
    for phase in ("fit", "score"):
        total = sum(v for k, v in stages.items() if k.startswith(phase))
        for stage, ms in stages.items():
            if stage.startswith(phase):
                lines.append(f"| {stage} | {ms:.2f} | {100 * ms / total:.0f}% |")
    acc = result["accuracy"]
    lines += [
        "",
        f"| measure (medians of {c['repeats']}) | value |",
        "|---|---:|",
        f"| fit, images/s (pipeline `fit` + factorisation, {c['n_train']} images) | "
        f"{result['fit_images_per_s']:.1f} |",
        f"| scoring, images/s (pipeline `decision_function`, {c['n_test']} images) | "
        f"{result['score_images_per_s']:.1f} |",
        f"| bare truncated backbone (torchvision), images/s | "
        f"{result['bare_backbone_images_per_s']:.1f} |",
        f"| the pipeline's backbone (batch norms folded), images/s | "
        f"{result['folded_backbone_images_per_s']:.1f} |",
        f"| **scoring / bare backbone** | {result['score_to_backbone_ratio']:.2f} |",
        f"| **fit / bare backbone** | {result['fit_to_backbone_ratio']:.2f} |",
        f"| scoring / folded backbone (PaDiM's own cost) | "
        f"{result['score_to_folded_backbone_ratio']:.2f} |",
        f"| fit / folded backbone | {result['fit_to_folded_backbone_ratio']:.2f} |",
    ]
    loaded = result["under_load"]
    if loaded:
        lines += [
            f"| under load: scoring, images/s | {loaded['score_images_per_s']:.1f} |",
            f"| under load: bare backbone, images/s | {loaded['bare_backbone_images_per_s']:.1f} |",
            f"| under load / idle: scoring | {loaded['score_to_idle_score_ratio']:.2f} |",
            f"| under load / idle: bare backbone | "
            f"{loaded['backbone_to_idle_backbone_ratio']:.2f} |",
        ]
    files = result["from_files"]
    if files:
        serial = 1 / (1 / result["score_images_per_s"] + files["decode_ms_per_image"] / 1000)
        lines += [
            f"| decoding + resizing {files['file_size']} px PNG files alone, ms / image | "
            f"{files['decode_ms_per_image']:.1f} |",
            f"| scoring from those files, images/s (without overlap it would be "
            f"{serial:.1f}) | {files['score_images_per_s']:.1f} |",
        ]
    lines += [
        f"| image AUROC, float32 / float16 covariance | {acc['float32']['image_auroc']:.4f} / "
        f"{acc['float16']['image_auroc']:.4f} |",
        f"| pixel AUROC, float32 / float16 covariance | {acc['float32']['pixel_auroc']:.4f} / "
        f"{acc['float16']['pixel_auroc']:.4f} |",
        f"| peak RSS, MB | {result['peak_rss_mb']:.0f} |",
        f"| fitted model in memory, MB | {result['model_mb_in_memory']:.1f} |",
        f"| fitted model as joblib file, MB (float16 covariance) | "
        f"{result['model_mb_joblib']:.1f} ({result['model_mb_joblib_float16']:.1f}) |",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none", help="'none', a name or a file")
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--under-load", action="store_true")
    parser.add_argument(
        "--file-size", type=int, default=0, help="also score from PNG files of this size"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.backbone}_d{args.n_features}_{args.image_size}_{result['machine']['device']}"
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
