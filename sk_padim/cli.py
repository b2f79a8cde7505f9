"""The ``sk-padim`` command: ``fit``, ``score``, ``evaluate`` and ``demo``.

Run ``sk-padim --help`` or ``sk-padim <command> --help``. Results (tables, CSV without
``-o``) go to standard output; messages and progress bars go to standard error.
Progress bars show when standard error is a terminal, or with ``--verbose``.

Exit codes: 0 success; 1 an error in the inputs (missing folder, unreadable image,
model file from an incompatible version, ...), reported on one line; 2 a wrong
command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import joblib
import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from sk_padim import __version__
from sk_padim.calibration import F1ThresholdCalibrator
from sk_padim.datasets import _image_paths, load_mvtec_ad
from sk_padim.demo import (
    DEMO_BACKBONE,
    Category,
    evaluate,
    maps_and_scores,
    padim_pipeline,
    results_table,
    run_demo,
)
from sk_padim.features import PatchFeatureTransformer
from sk_padim.persistence import load_model
from sk_padim.plotting import _pyplot, save_heatmaps

# Errors that come from the user's inputs; they are reported on one line. Anything
# else is a bug and keeps its traceback.
_USER_ERRORS = (OSError, ValueError, TypeError, ImportError, RuntimeError)
_SCORE_CHUNK = 256  # images scored at once: bounds the memory of features and maps
_FEATURE_DEFAULTS = PatchFeatureTransformer().get_params()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sk-padim`` command line.

    Parameters
    ----------
    argv : sequence of str, default=None
        The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    exit_code : int
        0 on success, 1 on an error in the inputs, 130 when interrupted. A wrong
        command line exits with 2 (raised by ``argparse`` as ``SystemExit``).

    Examples
    --------
    >>> from sk_padim.cli import main
    >>> main(["score", "no-such-model.joblib", "images/"])  # the error goes to stderr
    1
    """
    args = _parser().parse_args(argv)
    progress = args.verbose or (not args.quiet and sys.stderr.isatty())
    try:
        args.run(args, progress)
    except KeyboardInterrupt:
        print(f"sk-padim {args.command}: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        if args.verbose:
            traceback.print_exc()
        print(f"sk-padim {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------ parsers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sk-padim",
        description="PaDiM image anomaly detection: fit on images of normal parts, then "
        "score new images (higher score = more anomalous) and draw anomaly heat maps.",
        epilog="Run 'sk-padim <command> --help' for a command's options. Start with "
        "'sk-padim demo'.",
    )
    parser.add_argument("--version", action="version", version=f"sk-padim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    common = _common_options()
    model = _model_options()
    _add_fit(commands, [common, model])
    _add_score(commands, [common])
    _add_evaluate(commands, [common, model])
    _add_demo(commands, [common])
    return parser


def _common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show progress bars even when not in a terminal, and a traceback on errors",
    )
    noise.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no messages"
    )
    return parser


def _model_options() -> argparse.ArgumentParser:
    defaults = _FEATURE_DEFAULTS
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model options")
    group.add_argument(
        "--backbone",
        default=defaults["backbone"],
        help="torchvision model name (resnet18, wide_resnet50_2, efficientnet_b0, ...) or "
        f"{DEMO_BACKBONE} (weights ship with sk-padim[lite], no download) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--weights",
        type=_weights,
        default=defaults["weights"],
        help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state-dict file, or "
        "'none' for random weights (default: %(default)s)",
    )
    group.add_argument(
        "--layers",
        type=_layers,
        default=defaults["layers"],
        help="comma-separated module names, shallowest first, e.g. layer1,layer2,layer3 "
        "(default: the backbone's)",
    )
    group.add_argument(
        "--n-features",
        type=_positive_int,
        default=defaults["n_features"],
        help="number d of channels kept (default: the backbone's, 100 for resnet18)",
    )
    group.add_argument(
        "--image-size",
        type=_positive_int,
        default=defaults["image_size"],
        help="images are resized to this square size in pixels (default: %(default)s)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults["batch_size"],
        help="images per forward pass (default: %(default)s)",
    )
    group.add_argument(
        "--device",
        default=defaults["device"],
        help="auto, cpu, cuda or cuda:<i>; auto uses CUDA when available (default: %(default)s)",
    )
    group.add_argument(
        "--random-state",
        type=int,
        default=0,
        help="seed of the random channel choice (default: %(default)s)",
    )
    return parser


def _add_fit(commands, parents) -> None:
    parser = commands.add_parser(
        "fit",
        parents=parents,
        help="fit a model on images of normal parts",
        description="Fit PaDiM on a folder of images of normal parts, or on the train/good "
        "images of a category in the MVTec AD layout, and save the fitted pipeline with "
        "joblib. Load only model files you trust: loading runs code.",
    )
    parser.add_argument(
        "images",
        help="a folder of normal images, or an MVTec AD category folder (its train/good is used)",
    )
    parser.add_argument(
        "-o", "--output", required=True, help="model file to write, e.g. model.joblib"
    )
    parser.set_defaults(run=_fit)


def _add_score(commands, parents) -> None:
    parser = commands.add_parser(
        "score",
        parents=parents,
        help="score images with a fitted model",
        description="Score images with a model from 'sk-padim fit' (or a joblib file of an "
        "F1ThresholdCalibrator). Writes a CSV with one row per image: image, score (higher = "
        "more anomalous) and, with a threshold, label.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit'")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument(
        "-o",
        "--output",
        help="folder for scores.csv and heatmaps/ (default: CSV to standard output)",
    )
    parser.add_argument(
        "--heatmaps",
        action="store_true",
        help="also write a heat-map PNG per image to OUTPUT/heatmaps (needs sk-padim[plot])",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="label images whose score is >= THRESHOLD 'anomalous', others 'normal' "
        "(default: the threshold of a calibrated model; none otherwise)",
    )
    parser.add_argument(
        "--device", help="run on this device instead of the model's (auto, cpu, cuda)"
    )
    parser.set_defaults(run=_score, parser=parser)


def _add_evaluate(commands, parents) -> None:
    parser = commands.add_parser(
        "evaluate",
        parents=parents,
        help="fit and evaluate per category of an MVTec AD-layout dataset",
        description="For each category of a dataset in the MVTec AD layout, fit PaDiM on "
        "train/good and evaluate it on test/: prints image AUROC, pixel AUROC, AUPRO and "
        "times, and writes them to OUTPUT/results.csv and OUTPUT/results.md.",
    )
    parser.add_argument("root", help="dataset folder holding <category>/train/good, test, ...")
    parser.add_argument(
        "--categories", nargs="+", help="categories to evaluate (default: every one under ROOT)"
    )
    parser.add_argument(
        "-o",
        "--output",
        default="sk-padim-evaluation",
        help="folder for the results and heat maps (default: %(default)s)",
    )
    _add_heatmap_count(parser, default=0)
    parser.set_defaults(run=_evaluate)


def _add_demo(commands, parents) -> None:
    parser = commands.add_parser(
        "demo",
        parents=parents,
        help="fit and evaluate on the built-in dataset (no download)",
        description=f"Fit PaDiM with {DEMO_BACKBONE} (ImageNet weights from sk-padim[lite]) "
        "on the built-in defect textures, print image AUROC, pixel AUROC, AUPRO and "
        "throughput per category, and write heat-map pictures. Needs no network.",
    )
    parser.add_argument(
        "-o",
        "--output",
        default="sk-padim-demo",
        help="folder for the results and heat maps (default: %(default)s)",
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        default=["brick", "grass", "gravel"],
        help="texture categories (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=128,
        help="image and anomaly map size, 32 to 256 (default: %(default)s)",
    )
    parser.add_argument(
        "--n-train",
        type=_positive_int,
        default=40,
        help="normal training images per category (default: %(default)s)",
    )
    parser.add_argument("--random-state", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    _add_heatmap_count(parser, default=2)
    parser.set_defaults(run=_demo)


def _add_heatmap_count(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--n-heatmaps",
        type=_non_negative_int,
        default=default,
        help="heat-map PNGs per defect type and category, written to OUTPUT/heatmaps "
        "(needs sk-padim[plot]); 0 for none (default: %(default)s)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _weights(text: str) -> str | Path | None:
    if text.lower() == "none":
        return None
    return Path(text) if os.path.isfile(text) else text


def _layers(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


# ----------------------------------------------------------------------- commands


def _fit(args: argparse.Namespace, progress: bool) -> None:
    images, source = _training_images(Path(args.images).resolve())
    pipeline = _pipeline(args, progress)
    start = time.perf_counter()
    pipeline.fit(images)
    seconds = time.perf_counter() - start
    pipeline.set_params(feat__verbose=False)  # the saved model stays quiet
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipeline, output)
    _info(args, f"Fitted on {len(images)} images from {source} in {seconds:.1f} s; wrote {output}.")


def _score(args: argparse.Namespace, progress: bool) -> None:
    if args.heatmaps and args.output is None:
        args.parser.error("--heatmaps needs -o/--output DIR to write the pictures to")
    if args.heatmaps:
        _pyplot("sk-padim score --heatmaps")
    pipeline, threshold = _scoring_model(_load_model(Path(args.model)))
    threshold = args.threshold if args.threshold is not None else threshold
    if args.device is not None:
        _set_device(pipeline, args.device)
    paths = _image_files(args.images)
    if args.output is None:
        _write_scores(sys.stdout, pipeline, paths, threshold, None, progress)
        return
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    heatmaps = output / "heatmaps" if args.heatmaps else None
    with open(output / "scores.csv", "w", newline="") as file:
        _write_scores(file, pipeline, paths, threshold, heatmaps, progress)
    _info(args, f"Scored {len(paths)} images; wrote {output / 'scores.csv'}.")


def _write_scores(file, pipeline, paths, threshold, heatmaps: Path | None, progress: bool):
    """Score the images in chunks, writing CSV rows and, into ``heatmaps``, pictures.

    The pictures share one colour scale, from the median to the maximum of the first
    chunk's maps, and are named by :func:`_picture_names`.
    """
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(["image", "score"] + ([] if threshold is None else ["label"]))
    names = _picture_names(paths)
    scale = None
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), _SCORE_CHUNK):
            chunk = paths[start : start + _SCORE_CHUNK]
            maps, scores = maps_and_scores(pipeline, chunk)
            writer.writerows(_score_rows(chunk, scores, threshold))
            if heatmaps is not None:
                scale = scale or (float(np.median(maps)), float(maps.max()))
                chunk_names = names[start : start + len(chunk)]
                save_heatmaps(
                    chunk,
                    maps,
                    heatmaps,
                    threshold=threshold,
                    names=chunk_names,
                    vmin=scale[0],
                    vmax=scale[1],
                )
            bar.update(len(chunk))


def _evaluate(args: argparse.Namespace, progress: bool) -> None:
    root = Path(args.root)
    names = args.categories or _mvtec_categories(root)
    for name in names:  # find a missing folder now, not after fitting the others
        load_mvtec_ad(root, name, return_X_y=True)
        load_mvtec_ad(root, name, split="test", return_X_y=True)
    if args.n_heatmaps:
        _pyplot("sk-padim evaluate --n-heatmaps")
    results = evaluate(
        _pipeline(args, progress),
        names,
        lambda name: Category.from_mvtec(root, name),
        output=args.output,
        n_heatmaps=args.n_heatmaps,
        progress=progress,
    )
    print(results_table(results))
    _info(args, _written(Path(args.output), args.n_heatmaps))


def _demo(args: argparse.Namespace, progress: bool) -> None:
    if args.n_heatmaps:
        _pyplot("sk-padim demo (pass --n-heatmaps 0 to skip the pictures)")
    print(
        f"PaDiM with {DEMO_BACKBONE} (ImageNet weights, offline) on the built-in defect "
        f"textures, {args.image_size} x {args.image_size} px: fit on normal images, "
        "tested on normal and defective ones.\n"
    )
    start = time.perf_counter()
    results = run_demo(
        args.output,
        categories=args.categories,
        image_size=args.image_size,
        n_train=args.n_train,
        n_heatmaps=args.n_heatmaps,
        random_state=args.random_state,
        device=args.device,
        progress=progress,
    )
    print(results_table(results))
    seconds = time.perf_counter() - start
    print(f"\nTotal {seconds:.1f} s. {_written(Path(args.output), args.n_heatmaps)}")


# ------------------------------------------------------------------------ helpers


def _pipeline(args: argparse.Namespace, progress: bool) -> Pipeline:
    return padim_pipeline(
        backbone=args.backbone,
        weights=args.weights,
        layers=args.layers,
        n_features=args.n_features,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        random_state=args.random_state,
        verbose=progress,
    )


def _training_images(folder: Path) -> tuple[list[str], Path]:
    """The images of a folder, or of ``train/good`` in an MVTec AD category folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder not found: {folder}. Pass a folder of normal images.")
    if (folder / "train" / "good").is_dir():
        images, _ = load_mvtec_ad(folder.parent, folder.name, return_X_y=True)
        return images, folder / "train" / "good"
    return _image_paths(folder), folder


def _image_files(inputs: Sequence[str]) -> list[str]:
    """Image files given directly or inside the given folders, in the order given."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += _image_paths(item)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise FileNotFoundError(f"No such image file or folder: {item}.")
    return paths


def _picture_names(paths: Sequence[str]) -> list[str]:
    """Picture names: each path relative to the folder that holds all the images, without
    its suffix, ``/`` replaced by ``_`` (``good/000.png`` -> ``good_000``); a repeated
    name gets ``-2``, ``-3``, ... appended."""
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    root = os.path.commonpath(folders)
    counts: dict[str, int] = {}
    names = []
    for path in paths:
        name = os.path.splitext(os.path.relpath(os.path.abspath(path), root))[0]
        name = name.replace(os.sep, "_")
        counts[name] = counts.get(name, 0) + 1
        names.append(name if counts[name] == 1 else f"{name}-{counts[name]}")
    return names


def _load_model(path: Path):
    if not path.is_file():
        raise FileNotFoundError(
            f"Model file not found: {path}. Make one with: sk-padim fit <images> -o {path}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path)
    for warning in caught:
        print(f"sk-padim: warning: {_one_line(warning.message)}", file=sys.stderr)
    return model


def _scoring_model(model) -> tuple[Pipeline, float | None]:
    """The fitted image pipeline inside a loaded model, and its threshold if calibrated."""
    threshold = None
    if isinstance(model, F1ThresholdCalibrator):
        check_is_fitted(model)
        model, threshold = model.estimator_, model.threshold_
    is_image_model = (
        isinstance(model, Pipeline)
        and len(model.steps) > 1
        and all(hasattr(model[-1], name) for name in ("score_samples", "decision_function"))
    )
    if not is_image_model:
        raise TypeError(
            f"The model file holds a {type(model).__name__}, not an image model. Save a "
            "Pipeline of PatchFeatureTransformer and PadimDetector ('sk-padim fit' makes "
            "one), or an F1ThresholdCalibrator wrapping one."
        )
    check_is_fitted(model[-1])
    return model, threshold


def _set_device(pipeline: Pipeline, device: str) -> None:
    for step in pipeline.named_steps.values():
        if "device" in step.get_params(deep=False):
            step.set_params(device=device)


def _score_rows(paths: Sequence[str], scores: np.ndarray, threshold: float | None):
    for path, score in zip(paths, scores, strict=True):
        row = [path, float(score)]
        if threshold is not None:
            row.append("anomalous" if score >= threshold else "normal")
        yield row


def _mvtec_categories(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder not found: {root}.")
    names = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not names:
        raise FileNotFoundError(
            f"No category in the MVTec AD layout under {root}: expected "
            f"{root}/<category>/train/good. Pass the dataset's root folder."
        )
    return names


def _written(output: Path, n_heatmaps: int) -> str:
    pictures = f" and heat maps in {output / 'heatmaps'}" if n_heatmaps else ""
    return f"Wrote {output / 'results.csv'}, {output / 'results.md'}{pictures}."


def _info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _one_line(error) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
