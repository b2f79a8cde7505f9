"""ONNX export: file sizes, and onnxruntime's CPU throughput against the Python pipeline.

Example (the figures in docs/export.md)::

    python benchmarks/export_onnx.py --backbone resnet18 --n-features 100 --image-size 224

Fits a pipeline (random weights) on deterministic synthetic textures, exports it with
float32 and float16 storage, and times scoring the same uint8 images with the pipeline's
``decision_function`` and with an onnxruntime session on the CPU, side by side in one
process (medians of ``--repeats``). Sizes are compared with the same model holding a full
float32 inverse covariance per position, as exports that store the precision matrices do.
Prints a Markdown table and writes it, with the raw numbers as JSON, to ``--out``.
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
import onnxruntime
import torch
from bench_data import synthetic_images
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer, export_onnx


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(args, folder: str) -> dict:
    feat = PatchFeatureTransformer(
        backbone=args.backbone,
        weights=None,
        n_features=args.n_features,
        image_size=args.image_size,
        device=args.device,
        random_state=0,
    )
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector(device=args.device))])
    train = synthetic_images(args.n_train, args.image_size, seed=0)
    test = synthetic_images(args.n_test, args.image_size, seed=1)
    pipe.fit(train)
    n_positions, d = pipe[-1].statistics_.n_positions, pipe[-1].statistics_.n_features
    sizes, rates, differences = {}, {"python pipeline": []}, {}
    sessions = {}
    for storage in args.storage:
        path = Path(folder) / f"{storage}.onnx"
        export_seconds = seconds(
            lambda p=path, s=storage: export_onnx(pipe, p, float16=s == "float16")
        )
        external = path.with_name(path.name + ".data")
        sizes[storage] = {
            "bytes": path.stat().st_size + (external.stat().st_size if external.exists() else 0),
            "external_data": external.exists(),
            "export_seconds": export_seconds,
        }
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions[storage] = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        rates[f"onnxruntime, {storage}"] = []
    expected = pipe.decision_function(test)
    for storage, session in sessions.items():
        scores = np.concatenate(
            [
                session.run(["score"], {"images": test[i : i + args.batch_size]})[0]
                for i in range(0, len(test), args.batch_size)
            ]
        )
        differences[storage] = float(np.max(np.abs(scores - expected) / np.abs(expected)))
    for _ in range(args.repeats):
        rates["python pipeline"].append(len(test) / seconds(lambda: pipe.decision_function(test)))
        for storage, session in sessions.items():
            rates[f"onnxruntime, {storage}"].append(
                len(test)
                / seconds(
                    lambda s=session: [
                        s.run(["score"], {"images": test[i : i + args.batch_size]})
                        for i in range(0, len(test), args.batch_size)
                    ]
                )
            )
    packed = n_positions * d * (d + 1) // 2 * 4
    first = next(iter(sizes.values()))["bytes"] * (1 if "float32" in sizes else 0)
    full_inverse = first - packed + n_positions * d * d * 4 if first else None
    return {
        "config": vars(args),
        "threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "sizes": sizes,
        "full_inverse_model_bytes": full_inverse,
        "size_ratios": {
            s: v["bytes"] / full_inverse if full_inverse else None for s, v in sizes.items()
        },
        "score_max_relative_difference": differences,
        "images_per_s": {name: statistics.median(values) for name, values in rates.items()},
    }


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"### {c['backbone']}, d={c['n_features']}, {c['image_size']} px, pipeline on "
        f"{c['device']}, onnxruntime on the CPU, {result['threads']} threads, onnxruntime "
        f"{result['onnxruntime']}, torch {result['torch']}",
        "",
        "| storage | file, MB | external data | x full-inverse model | export, s | "
        "max relative score difference |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for storage, size in result["sizes"].items():
        ratio = result["size_ratios"][storage]
        lines.append(
            f"| {storage} | {size['bytes'] / 1e6:.1f} | {size['external_data']} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {size['export_seconds']:.1f} | "
            f"{result['score_max_relative_difference'][storage]:.1e} |"
        )
    full = result["full_inverse_model_bytes"]
    lines += [
        "",
        f"(the same model with a full float32 inverse covariance per position: "
        f"{'-' if full is None else f'{full / 1e6:.1f}'} MB)",
        "",
        f"| scoring {c['n_test']} images, batch {c['batch_size']} (medians of "
        f"{c['repeats']}) | images/s |",
        "|---|---:|",
    ]
    for name, rate in result["images_per_s"].items():
        lines.append(f"| {name} | {rate:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the pipeline fits and scores")
    parser.add_argument(
        "--storage", nargs="+", default=["float32", "float16"], choices=["float32", "float16"]
    )
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = run(args, folder)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"export-{args.backbone}-d{args.n_features}-{args.image_size}-{args.device}"
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    main()
