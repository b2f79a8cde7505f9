"""The public Pipeline against the bare backbone, from host uint8 arrays, on one device.

Example (the GPU figures in docs/performance.md)::

    python benchmarks/device_core.py --device cuda --backbone wide_resnet50_2 \
        --n-features 550 --image-size 256 --n-train 200 --n-test 200

What a user does: images in host memory as ``uint8`` arrays ``(n, H, W, 3)``, a
``Pipeline([PatchFeatureTransformer(device=...), PadimDetector(device=...)])``, and
``fit`` (factorisation and the default threshold included), ``decision_function`` and
``score_samples`` with NumPy results. The reference is torchvision's backbone truncated
after the deepest layer (``create_feature_extractor``, batch norms not folded), given the
same batches: copied to the device, normalised there, forward. Throughputs are medians
over ``--repeats`` runs after a warm-up, in one process; peak device memory is measured
per phase (CUDA only). Weights are random (speed does not depend on their values), read
from a state-dict file as pretrained ones would be (``--weights none`` initialises them
at random in every ``fit`` instead, which costs more than the forward passes for
Wide-ResNet-50-2).
The script prints a Markdown table and writes it, with the raw numbers as JSON, to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import synthetic_images
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from torchvision.models.feature_extraction import create_feature_extractor

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core.backbones import load_backbone
from sk_padim.core.devices import resolve_device


def synchronised(device: torch.device, call):
    """Seconds of ``call()``, waiting for the device before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def weights_file(backbone: str, folder: str) -> str:
    """Random weights of ``backbone`` saved as a state-dict file."""
    path = os.path.join(folder, f"{backbone}.pth")
    torch.save(load_backbone(backbone, None, init_seed=0).state_dict(), path)
    return path


def bare_backbone(args, layers, device):
    """torchvision's model truncated after the deepest layer, and its forward on pixels."""
    model = load_backbone(args.backbone, None, init_seed=0)
    truncated = create_feature_extractor(model, {layer: layer for layer in layers})
    truncated = truncated.to(device, memory_format=torch.channels_last).eval()
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)

    def run(images: np.ndarray) -> None:
        with torch.inference_mode():
            for start in range(0, len(images), args.batch_size):
                chunk = torch.from_numpy(images[start : start + args.batch_size])
                pixels = chunk.to(device).permute(0, 3, 1, 2).float().div_(255)
                x = ((pixels - mean) / std).contiguous(memory_format=torch.channels_last)
                truncated(x)

    return run


def peak_gib(device: torch.device, call) -> float | None:
    """Peak device memory (GiB) allocated while ``call()`` runs (CUDA only)."""
    if device.type != "cuda":
        call()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def run(args, folder: str) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    feat = PatchFeatureTransformer(
        backbone=args.backbone,
        weights=None if args.weights == "none" else weights_file(args.backbone, folder),
        n_features=args.n_features,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=device,
        random_state=0,
    )
    pipe = Pipeline(
        [("feat", feat), ("padim", PadimDetector(batch_size=args.batch_size, device=device))]
    )
    train = synthetic_images(args.n_train, args.image_size, seed=0)
    test = synthetic_images(args.n_test, args.image_size, seed=1)
    bare = bare_backbone(args, feat.fit().layers_, device)

    pipe.fit(train[: 2 * args.batch_size])  # warm-up: kernels, allocator, caches
    pipe.decision_function(test[: args.batch_size])
    bare(test[: args.batch_size])

    rates = {"bare backbone": [], "fit": [], "decision_function": [], "score_samples": []}
    build_seconds = []
    peaks = {}
    for _ in range(args.repeats):
        rates["bare backbone"].append(args.n_test / synchronised(device, lambda: bare(test)))
        rates["fit"].append(args.n_train / synchronised(device, lambda: pipe.fit(train)))
        build_seconds.append(synchronised(device, lambda: clone(feat).fit()))
        rates["decision_function"].append(
            args.n_test / synchronised(device, lambda: np.asarray(pipe.decision_function(test)))
        )
        rates["score_samples"].append(
            args.n_test / synchronised(device, lambda: np.asarray(pipe.score_samples(test)))
        )
    if device.type == "cuda":
        # A refit drops the previous model's device memory before it starts.
        peaks["fit"] = peak_gib(device, lambda: pipe.fit(train))
        peaks["decision_function"] = peak_gib(device, lambda: pipe.decision_function(test))
        peaks["score_samples"] = peak_gib(device, lambda: pipe.score_samples(test))
        peaks["bare backbone"] = peak_gib(device, lambda: bare(test))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "config": {**vars(args), "device": str(device)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "images_per_s": medians,
        "all_images_per_s": rates,
        "ratio_to_bare_backbone": {
            name: rate / medians["bare backbone"] for name, rate in medians.items()
        },
        "peak_device_gib": peaks,
        "transformer_fit_seconds": statistics.median(build_seconds),
    }


def markdown(result: dict) -> str:
    c = result["config"]
    where = result["gpu"] or f"CPU, {result['threads']} threads"
    lines = [
        f"### {c['backbone']}, d={c['n_features']}, {c['image_size']} px, batch "
        f"{c['batch_size']}, {c['n_train']} + {c['n_test']} images, {where}, "
        f"torch {result['torch']}",
        "",
        f"| from host uint8 arrays (medians of {c['repeats']}) | images/s | "
        "x bare backbone | peak device memory, GiB |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in result["images_per_s"].items():
        peak = result["peak_device_gib"].get(name)
        lines.append(
            f"| {name} | {rate:.0f} | {result['ratio_to_bare_backbone'][name]:.2f} | "
            f"{'-' if peak is None else f'{peak:.2f}'} |"
        )
    source = "random init" if c["weights"] == "none" else "weights from a file"
    lines.append(
        f"\n`fit` includes the transformer's own fit (building the backbone, {source}: "
        f"{result['transformer_fit_seconds']:.2f} s of each fit)."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="file", choices=["file", "none"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = run(args, folder)
    table = markdown(result)
    print(table)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"device_core-{args.backbone}-d{args.n_features}-{result['config']['device']}"
        stem = stem.replace(":", "")
        (folder / f"{stem}.md").write_text(table + "\n")
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
