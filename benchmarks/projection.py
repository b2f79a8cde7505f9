"""Random channels (PaDiM) against the semi-orthogonal embedding: accuracy and speed.

Example (the figures in docs/algorithm.md)::

    python benchmarks/projection.py --accuracy --speed

Accuracy: the built-in defect textures (``make_defect_textures``: brick, grass, gravel,
128 px, 40 training images per category) with ``efficientnet_lite0``'s ImageNet
weights (the ``lite`` extra), for both projections at d in {50, 100, 150} (its layers
have 176 channels) and three seeds (the seed draws the channels or the matrix, and the
data); mean and spread over
seeds of the categories' mean image AUROC, pixel AUROC and AUPRO. Speed: ``transform``
time of both projections (ResNet-18/d=100 and Wide-ResNet-50-2/d=550 at 224 px, random
weights), and the two orders of the projection on the same layer outputs: per layer on
its own grid then upsampled (what the library does), or every layer upsampled,
concatenated, then projected. Prints Markdown tables and writes them, with the raw
numbers as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sk_padim import PatchFeatureTransformer, make_defect_textures
from sk_padim.evaluation import Category, evaluate, padim_pipeline

PROJECTIONS = ("channels", "semi_orthogonal")


def accuracy(args) -> dict:
    rows = {}
    for projection in PROJECTIONS:
        for d in args.dims:
            runs = []
            for seed in range(args.seeds):
                data = make_defect_textures(image_size=args.image_size, random_state=seed)
                pipe = padim_pipeline(
                    backbone="efficientnet_lite0",
                    image_size=args.image_size,
                    n_features=d,
                    random_state=seed,
                    projection=projection,
                    device="cpu",
                )
                pipe.set_params(padim__map_size=args.image_size)
                results = evaluate(
                    pipe,
                    list(data),
                    lambda name, data=data: Category.from_textures(name, data[name]),
                )
                runs.append(
                    {
                        metric: float(np.mean([getattr(r, metric) for r in results]))
                        for metric in ("image_auroc", "pixel_auroc", "aupro")
                    }
                )
            rows[f"{projection}, d={d}"] = runs
            print(projection, d, runs, flush=True)
    return rows


def _seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _order_seconds(feat, images: np.ndarray, repeats: int) -> tuple[float, float]:
    """Seconds of the two orders of projecting and upsampling, on the same layer outputs."""
    embedding = feat.to_module("cpu")
    matrix = torch.from_numpy(feat.projection_)
    with torch.inference_mode():
        pixels = embedding.normalise(torch.from_numpy(images).permute(0, 3, 1, 2))
        layers = embedding.backbone(pixels.contiguous(memory_format=torch.channels_last))

        def concatenate_then_project():
            grid = layers[0].shape[2:]
            upsampled = [F.interpolate(x, size=grid, mode="nearest") for x in layers]
            return torch.matmul(torch.cat(upsampled, dim=1).permute(0, 2, 3, 1), matrix)

        out = torch.empty(len(images), *feat.feature_shape_)  # as transform writes it
        per_layer = _seconds(lambda: embedding.assemble(layers, out), repeats)
        return per_layer, _seconds(concatenate_then_project, repeats)


def speed(args) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n_images, 224, 224, 3), dtype=np.uint8)
    rows = {}
    for backbone, d in (("resnet18", 100), ("wide_resnet50_2", 550)):
        for projection in PROJECTIONS:
            feat = PatchFeatureTransformer(
                backbone=backbone,
                weights=None,
                n_features=d,
                image_size=224,
                device="cpu",
                random_state=0,
                projection=projection,
            ).fit()
            feat.transform(images[:2])
            rows[f"{backbone} d={d}: transform, {projection}"] = args.n_images / _seconds(
                lambda feat=feat: feat.transform(images), args.repeats
            )
        per_layer, concatenated = _order_seconds(feat, images[:8], args.repeats)
        rows[f"{backbone} d={d}: projection per layer then upsampled, ms / image"] = (
            1000 * per_layer / 8
        )
        rows[f"{backbone} d={d}: upsampled, concatenated, projected, ms / image"] = (
            1000 * concatenated / 8
        )
    return rows


def markdown(result: dict) -> str:
    lines = []
    if "accuracy" in result:
        lines += [
            "| projection | image AUROC | pixel AUROC | AUPRO |",
            "|---|---|---|---|",
        ]
        for name, runs in result["accuracy"].items():
            cells = []
            for metric in ("image_auroc", "pixel_auroc", "aupro"):
                values = [run[metric] for run in runs]
                cells.append(f"{np.mean(values):.4f} +- {np.std(values):.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if "speed" in result:
        lines += ["| measure (CPU) | value |", "|---|---:|"]
        for name, value in result["speed"].items():
            unit = "" if "ms / image" in name else " images/s"
            lines.append(f"| {name}{unit} | {value:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--dims", type=int, nargs="+", default=[50, 100, 150])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    result = {"config": vars(args)}
    if args.accuracy:
        result["accuracy"] = accuracy(args)
    if args.speed:
        result["speed"] = speed(args)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "projection.md").write_text(table + "\n")
        (out / "projection.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
