"""High resolution: PaDiM resized, at native resolution and in texture mode, against anomalib.

Example (the figures of docs/high_resolution.md; on an idle machine)::

    python benchmarks/high_resolution.py --backbone resnet18 \
        --sizes 1024 2048 4096 2000x8000 --modes resize:256 resize:512 native texture:64 \
        --anomalib-python /work/venv-anomalib/bin/python --out high_resolution.json

Data: for each size (``N`` or ``HxW``, height by width), ``make_high_resolution_textures``
(mosaics of a texture photograph at its own pixel scale, one 4-9 px defect per defective
image) written once as PNG files, which every configuration reads as a user's files would
be read. Weights: ``--weights none`` initialises the backbone at random with seed 0, and
that backbone is saved to a file that both sk-padim and anomalib load, with the same ``d``
channels, so that the two libraries compare on the same features.

Each configuration runs in its own process: its peak RSS is that process's ``ru_maxrss``
(``os.wait4``, so a configuration that fails still reports it), and a failure (an unknown
parameter, an allocation over ``--address-space-gb``) becomes the error in its row. A
configuration fits the pipeline on the training files, then scores the test files
``--score-batch`` at a time (default 1; the maps written to a file as they come, upsampled
bilinearly to the image's size where they are smaller), then, in the same batches, times
the transformer alone and the detector alone on the transformer's features. The
``backbone`` rows time torchvision's truncated backbone alone (batch norms not folded,
after one warm-up pass) on the decoded, normalised pixels at the size the pipeline
processes. Times per image are medians over the test images (the first call's warm-up
does not count). "PaDiM's own cost" is the detector's scoring of the features (distances,
upsampling, smoothing), timed directly rather than as the difference of two noisier
times, and its ratio to the bare backbone is the issue's target (<= 0.25 at 2048 px
native). Pixel
and image AUROC (``sk_padim.metrics``; image score = the map's maximum) are computed in the
parent from the maps on disk.

sk-padim configurations (``--modes``): ``resize:N`` (``image_size=N``), ``native``
(``image_size=None``) and ``texture:T`` (``image_size=None``,
``PadimDetector(texture_tile=T)``: tiles of ``T x T`` feature cells, ``4T`` px);
``--detector-kwargs`` and ``--transformer-kwargs`` (JSON) add parameters to every
configuration, e.g. ``'{"store": "/tmp/store"}'``; all other parameters are the defaults.
anomalib's ``PadimModel`` (``--anomalib-modes``: ``resize:N``, ``native``, ``tiler:T``,
the last with its ``Tiler`` of ``T``-px tiles and stride ``T``) runs in the interpreter
``--anomalib-python`` where anomalib imports, otherwise its rows are skipped with a note;
it fits one image at a time (its memory bank keeps every embedding) and scores in the
same batches as sk-padim.

Prints Markdown tables and writes them with the raw numbers as JSON to ``--out``. This
module imports sk_padim inside functions only: the anomalib child runs this file in
another environment, without sk_padim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEED = 0


# ----------------------------------------------------------------------------- data


def parse_size(text: str) -> tuple[int, int]:
    """``"2048"`` -> (2048, 2048); ``"2000x8000"`` -> (2000, 8000), height by width."""
    parts = [int(part) for part in text.lower().split("x")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    return (parts[0], parts[-1])


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}" if size[0] != size[1] else str(size[0])


def write_dataset(folder: Path, size: tuple[int, int], args) -> dict:
    """The dataset of one size as PNG files plus masks and labels (reused if present)."""
    meta_path = folder / "meta.json"
    wanted = {
        "size": list(size),
        "category": args.category,
        "n_train": args.n_train,
        "n_test_good": args.n_test_good,
        "n_test_defective": args.n_test_defective,
        "defect_size": list(args.defect_size),
        "seed": SEED,
    }
    if meta_path.is_file() and json.loads(meta_path.read_text())["params"] == wanted:
        return json.loads(meta_path.read_text())
    from sk_padim.synthetic import make_high_resolution_textures

    data = make_high_resolution_textures(
        args.category,
        image_size=size,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defective=args.n_test_defective,
        defect_size=tuple(args.defect_size),
        random_state=SEED,
    )
    meta = {
        "params": wanted,
        "train": write_pngs(data.X_train, folder / "train"),
        "test": write_pngs(data.X_test, folder / "test"),
        "masks": str(folder / "masks.npy"),
        "labels": data.y_test.tolist(),
    }
    np.save(meta["masks"], data.masks_test)
    meta_path.write_text(json.dumps(meta))
    return meta


def write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:03d}.png") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image).save(path, compress_level=1)
    return paths


def save_backbone(folder: Path, args) -> dict:
    """The backbone's weights as a state-dict file and a whole-module file; its layers."""
    from sk_padim import PatchFeatureTransformer
    from sk_padim.core.backbones import load_backbone

    weights = None if args.weights == "none" else args.weights
    model = load_backbone(args.backbone, weights, init_seed=SEED)
    state_path, module_path = folder / "weights.pt", folder / "module.pt"
    torch.save(model.state_dict(), state_path)
    torch.save(model, module_path)
    probe = PatchFeatureTransformer(
        args.backbone, weights=str(state_path), n_features=args.d, image_size=64, random_state=0
    ).fit()
    return {
        "weights": str(state_path),
        "module": str(module_path),
        "layers": list(probe.layers_),
        "channel_indices": probe.channel_indices_.tolist(),
        "normalization": [list(values) for values in probe.normalization_],
    }


# --------------------------------------------------------------------- the children


def load_pixels(path: str, size: tuple[int, int] | None, normalization) -> torch.Tensor:
    """A PNG file as normalised float pixels (1, 3, H, W), resized (antialiased) to size."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    pixels = pixels.permute(2, 0, 1)[None].float() / 255
    if size is not None and tuple(pixels.shape[2:]) != tuple(size):
        pixels = torch.nn.functional.interpolate(
            pixels, size=size, mode="bilinear", align_corners=False, antialias=True
        )
    mean, std = (torch.tensor(values)[None, :, None, None] for values in normalization)
    return ((pixels - mean) / std).contiguous(memory_format=torch.channels_last)


def seconds_of(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def chunks(paths: list[str], size: int) -> list[list[str]]:
    return [paths[start : start + size] for start in range(0, len(paths), size)]


def score_to_file(score_batch, spec: dict):
    """Score the test images a batch at a time, writing their maps at the images' size.

    Returns the seconds per image (each batch's time over its images) and image scores.
    """
    seconds, scores = [], []
    with open(spec["maps"], "wb") as maps_file:
        for batch in chunks(spec["test"], spec["score_batch"]):
            start = time.perf_counter()
            maps = np.asarray(score_batch(batch), dtype=np.float32)
            seconds += [(time.perf_counter() - start) / len(batch)] * len(batch)
            scores += maps.max(axis=(1, 2)).tolist()
            if maps.shape[1:] != spec["shape"]:
                maps = torch.nn.functional.interpolate(
                    torch.from_numpy(maps)[:, None], size=spec["shape"], mode="bilinear"
                )[:, 0].numpy()
            maps.tofile(maps_file)
    return seconds, scores


def child_sk_padim(spec: dict) -> dict:
    from sklearn.pipeline import Pipeline

    from sk_padim import PadimDetector, PatchFeatureTransformer

    feat = PatchFeatureTransformer(
        spec["backbone"],
        weights=spec["weights"],
        n_features=spec["d"],
        image_size=spec["image_size"],
        random_state=0,
        **spec["transformer_kwargs"],
    )
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector(**spec["detector_kwargs"]))])
    if spec["fit_chunk"]:  # a chunk of images' features at a time ("auto": the default)
        from sk_padim import fit_streaming

        chunk = None if spec["fit_chunk"] == "auto" else int(spec["fit_chunk"])
        fit_s = seconds_of(lambda: fit_streaming(pipe, spec["train"], chunk))
    else:
        fit_s = seconds_of(lambda: pipe.fit(spec["train"]))
    score_s, scores = score_to_file(pipe.score_samples, spec)
    feat, detector = pipe[0], pipe[-1]  # fit_streaming puts fitted copies in the pipeline
    transform_s, own_s = [], []
    for batch in chunks(spec["test"], spec["score_batch"]):
        start = time.perf_counter()
        features = feat.transform(batch)
        middle = time.perf_counter()
        detector.score_samples(features)
        end = time.perf_counter()
        transform_s += [(middle - start) / len(batch)] * len(batch)
        own_s += [(end - middle) / len(batch)] * len(batch)
        del features
    return {
        "fit_s": fit_s,
        "score_s": score_s,
        "transform_s": transform_s,
        "own_s": own_s,
        "scores": scores,
    }


def child_backbone(spec: dict) -> dict:
    """torchvision's truncated backbone alone on decoded, normalised pixels."""
    from sk_padim.core.backbones import TruncatedBackbone, load_backbone

    pixels = [load_pixels(path, spec["size"], spec["normalization"]) for path in spec["test"]]
    model = load_backbone(spec["backbone"], spec["weights"], init_seed=SEED)
    backbone = TruncatedBackbone(model, tuple(spec["layers"]), pixels[0])
    backbone = backbone.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        backbone(pixels[0])  # warm-up: kernel selection, allocator
        backbone_s = [seconds_of(lambda x=x: backbone(x)) for x in pixels]
    return {"backbone_s": backbone_s}


def child_anomalib(spec: dict) -> dict:
    """anomalib's PadimModel on the same backbone file and channels, one image a batch.

    It fits on one training image at a time (its memory bank keeps all embeddings) and
    scores ``--score-batch`` images at a time, as sk-padim does.
    """
    from anomalib.data.utils.tiler import Tiler
    from anomalib.models.image.padim.torch_model import PadimModel

    backbone = torch.load(spec["module"], weights_only=False)
    model = PadimModel(backbone, layers=spec["layers"], pre_trained=False, n_features=spec["d"])
    model.idx = torch.as_tensor(spec["channel_indices"])
    if spec["tile"]:
        model.tiler = Tiler(tile_size=spec["tile"], stride=spec["tile"])
    pixels = partial(load_pixels, size=spec["size"], normalization=spec["normalization"])

    def fit():
        model.train()
        for path in spec["train"]:
            model(pixels(path))
        model.fit()

    fit_s = seconds_of(fit)
    model.eval()
    with torch.no_grad():
        score_s, scores = score_to_file(
            lambda batch: model(torch.cat([pixels(path) for path in batch])).anomaly_map[:, 0],
            spec,
        )
    return {"fit_s": fit_s, "score_s": score_s, "scores": scores}


CHILDREN = {"sk-padim": child_sk_padim, "backbone": child_backbone, "anomalib": child_anomalib}


def run_child_here(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    spec["shape"] = tuple(spec["shape"])
    result = CHILDREN[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------ the parent


def cap_address_space(gigabytes: float) -> None:
    limit = int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_child(python: str, spec: dict, folder: Path, cap_gb: float) -> dict:
    """Run one configuration in its own process; its result, peak RSS and any error."""
    stem = folder / re.sub(r"\W+", "_", spec["name"])
    spec = {**spec, "result": f"{stem}.result.json", "maps": f"{stem}.maps"}
    Path(f"{stem}.spec.json").write_text(json.dumps(spec))
    log_path = Path(f"{stem}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [python, __file__, "--child", f"{stem}.spec.json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=partial(cap_address_space, cap_gb),
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    figures = {
        "name": spec["name"],
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # on a busy machine, steadier than wall_s
    }
    if process.returncode == 0:
        result = json.loads(Path(spec["result"]).read_text())
        maps = {"maps": spec["maps"]} if os.path.isfile(spec["maps"]) else {}
        return {**figures, **result, **maps}
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    error = lines[-1].strip() if lines else f"exit status {process.returncode}"
    if process.returncode < 0:
        error = f"killed by signal {-process.returncode} ({error})"
    return {**figures, "error": error}


def accuracy(result: dict, meta: dict, shape: tuple[int, int]) -> dict:
    """Pixel and image AUROC of a configuration's maps, read back from its file."""
    from sk_padim.metrics import image_auroc, pixel_auroc

    labels = np.asarray(meta["labels"])
    maps = np.memmap(result.pop("maps"), dtype=np.float32, mode="r")
    maps = maps.reshape(len(labels), *shape)
    figures = {
        "pixel_auroc": pixel_auroc(np.load(meta["masks"], mmap_mode="r"), maps),
        "image_auroc": image_auroc(labels, result["scores"]),
    }
    os.remove(maps.filename)
    return figures


def anomalib_note(python: str | None) -> str | None:
    """Why the anomalib rows are skipped, or None if anomalib imports there."""
    if python is None:
        return "anomalib skipped: pass --anomalib-python, an interpreter where it imports"
    check = "from anomalib.models.image.padim.torch_model import PadimModel"
    done = subprocess.run([python, "-c", check], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return f"anomalib skipped: it does not import in {python} ({lines[-1]})"
    return None


def parse_mode(text: str, kinds: tuple[str, ...]) -> tuple[str, int | None]:
    kind, _, value = text.partition(":")
    if kind not in kinds or (kind == "native") != (value == ""):
        raise argparse.ArgumentTypeError(
            f"mode must be one of {[k + ('' if k == 'native' else ':N') for k in kinds]}, "
            f"got {text!r}"
        )
    return kind, int(value) if value else None


def sk_padim_spec(mode, args) -> dict:
    kind, value = mode
    detector_kwargs = dict(args.detector_kwargs)
    if kind == "texture":
        detector_kwargs["texture_tile"] = value
    return {
        "kind": "sk-padim",
        "name": f"sk-padim {kind}" + (f":{value}" if value else ""),
        "image_size": value if kind == "resize" else None,
        "processed": value if kind == "resize" else None,
        "detector_kwargs": detector_kwargs,
        "transformer_kwargs": args.transformer_kwargs,
    }


def anomalib_spec(mode) -> dict:
    kind, value = mode
    return {
        "kind": "anomalib",
        "name": f"anomalib {kind}" + (f":{value}" if value else ""),
        "size": (value, value) if kind == "resize" else None,
        "processed": value if kind == "resize" else None,
        "tile": value if kind == "tiler" else None,
    }


def per_image(seconds: list[float]) -> float:
    """The median over the images: the first call's warm-up does not count."""
    return float(np.median(seconds))


def run_size(size, args, backbone: dict, work: Path, skip_anomalib: str | None) -> list[dict]:
    """Every configuration of one image size; the rows."""
    folder = Path(args.data_dir or work) / f"{args.category}-{size_name(size)}"
    meta = write_dataset(folder, size, args)
    common = {
        "backbone": args.backbone,
        "d": args.d,
        "score_batch": args.score_batch,
        "fit_chunk": args.fit_chunk,
        "train": meta["train"],
        "test": meta["test"],
        "shape": size,
        **backbone,
    }
    specs = [sk_padim_spec(mode, args) for mode in args.modes]
    if skip_anomalib is None:
        specs += [anomalib_spec(mode) for mode in args.anomalib_modes]
    processed = sorted({spec["processed"] or 0 for spec in specs})
    specs += [
        {
            "kind": "backbone",
            "name": f"backbone {p or 'native'}",
            "size": (p, p) if p else None,
            "processed": p or None,
        }
        for p in processed
    ]
    rows = []
    for spec in specs:
        spec = {**common, **spec, "name": f"{spec['name']} @ {size_name(size)}"}
        python = args.anomalib_python if spec["kind"] == "anomalib" else sys.executable
        print(f"running {spec['name']} ...", file=sys.stderr, flush=True)
        row = run_child(python, spec, work, args.address_space_gb)
        if "maps" in row:
            row.update(accuracy(row, meta, size))
        rows.append({**row, "kind": spec["kind"], "processed": spec["processed"]})
    return with_ratios(rows, size)


def with_ratios(rows: list[dict], size: tuple[int, int]) -> list[dict]:
    """Per-image times, seconds per megapixel and PaDiM's own cost against the backbone."""
    backbone_s = {
        row["processed"]: per_image(row["backbone_s"])
        for row in rows
        if row["kind"] == "backbone" and "backbone_s" in row
    }
    for row in rows:
        if "error" in row:
            continue
        side = row["processed"]
        megapixels = (side * side if side else size[0] * size[1]) / 1e6
        row["megapixels_processed"] = megapixels
        for key in ("score_s", "transform_s", "own_s", "backbone_s"):
            if key in row:
                row[f"{key[:-2]}_s_per_image"] = per_image(row[key])
                row[f"{key[:-2]}_s_per_megapixel"] = per_image(row[key]) / megapixels
        reference = backbone_s.get(side)
        if "own_s" in row and reference:
            row["own_to_backbone"] = row["own_s_per_image"] / reference
    return rows


def cell(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else ""


def markdown(rows: list[dict], notes: list[str], args) -> str:
    lines = [
        f"### {args.backbone}, d={args.d}, weights {args.weights}, {args.category}, "
        f"{args.n_train} train / {args.n_test_good} good + {args.n_test_defective} defective "
        f"test images, defects {args.defect_size[0]}-{args.defect_size[1]} px, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| configuration | pixel AUROC | image AUROC | fit s | scoring s/image "
        "| transformer s/image | PaDiM own s/image | own / bare backbone | peak RSS GB | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["kind"] == "backbone":
            continue
        lines.append(
            f"| {row['name']} | {cell(row, 'pixel_auroc', 3)} | {cell(row, 'image_auroc', 3)} "
            f"| {cell(row, 'fit_s', 1)} | {cell(row, 'score_s_per_image', 2)} "
            f"| {cell(row, 'transform_s_per_image', 2)} | {cell(row, 'own_s_per_image', 2)} "
            f"| {cell(row, 'own_to_backbone', 2)} | {row['peak_rss_gb']:.2f} "
            f"| {row.get('error', '')} |"
        )
    lines += [
        "",
        "| bare backbone (torchvision, truncated) | s/image | s/megapixel | peak RSS GB | error |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["kind"] == "backbone":
            lines.append(
                f"| {row['name']} | {cell(row, 'backbone_s_per_image', 3)} "
                f"| {cell(row, 'backbone_s_per_megapixel', 3)} | {row['peak_rss_gb']:.2f} "
                f"| {row.get('error', '')} |"
            )
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="resnet18", help="resnet18, efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="'none' (seed 0), a name or a file")
    parser.add_argument("--d", type=int, default=100, help="n_features")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(1024, 1024)])
    parser.add_argument(
        "--modes",
        nargs="+",
        type=partial(parse_mode, kinds=("resize", "native", "texture")),
        default=[("resize", 256), ("native", None)],
    )
    parser.add_argument(
        "--anomalib-modes",
        nargs="+",
        type=partial(parse_mode, kinds=("resize", "native", "tiler")),
        default=[("native", None), ("tiler", 256)],
    )
    parser.add_argument("--anomalib-python", help="an interpreter where anomalib imports")
    parser.add_argument("--score-batch", type=int, default=1, help="test images per call")
    parser.add_argument(
        "--fit-chunk",
        help="sk-padim fits with fit_streaming, this many images' features at a time "
        "('auto': its default, one backbone pass)",
    )
    parser.add_argument("--detector-kwargs", type=json.loads, default={})
    parser.add_argument("--transformer-kwargs", type=json.loads, default={})
    parser.add_argument("--category", default="brick", help="brick, grass, gravel")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defective", type=int, default=12)
    parser.add_argument("--defect-size", nargs=2, type=int, default=[4, 9])
    parser.add_argument("--data-dir", help="keep the PNG files here, reused by later runs")
    parser.add_argument(
        "--address-space-gb",
        type=float,
        default=20.0,
        help="RLIMIT_AS of each child (imports alone take about 4 GB of address space)",
    )
    parser.add_argument("--out", default="high_resolution.json")
    args = parser.parse_args(argv)
    if args.child:
        return run_child_here(args.child)

    note = anomalib_note(args.anomalib_python)
    rows = []
    with tempfile.TemporaryDirectory(prefix="high_resolution_") as work:
        backbone = save_backbone(Path(work), args)
        for size in args.sizes:
            rows += run_size(size, args, backbone, Path(work), note)
    notes = [note] if note else []
    table = markdown(rows, notes, args)
    print(table)
    config = {k: v for k, v in vars(args).items() if k != "child"}
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    result = {"config": config, "machine": machine, "rows": rows, "notes": notes}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
