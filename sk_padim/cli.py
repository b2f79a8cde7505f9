"""The ``sk-padim`` command: ``fit``, ``score``, ``calibrate``, ``evaluate`` and ``demo``.

Run ``sk-padim --help`` or ``sk-padim <command> --help``. Results (tables, CSV without
``-o``) go to standard output; messages and progress bars go to standard error.
Progress bars show when standard error is a terminal, or with ``--verbose``.

Exit codes: 0 success; 1 an error in the inputs (missing folder, unreadable image,
model file from an incompatible version, ...), reported on one line; 2 a wrong
command line; 130 interrupted. An image is anomalous when its score is ``>=`` the
threshold, as for ``PadimDetector.predict`` and ``F1ThresholdCalibrator``.

The command calls the library's public functions only: image discovery
(:func:`~sk_padim.datasets.list_images`), the MVTec AD scan, the evaluation harness and
the pictures all live in the library.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
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

from sk_padim._checks import one_line
from sk_padim._version import __version__
from sk_padim.calibration import F1ThresholdCalibrator
from sk_padim.datasets import (
    find_mvtec_categories,
    list_images,
    load_masks,
    load_mvtec_ad,
    load_mvtec_category,
)
from sk_padim.demo import DEMO_BACKBONE, run_demo
from sk_padim.evaluation import evaluate, maps_and_scores, padim_pipeline, results_table
from sk_padim.export import export_onnx
from sk_padim.features import PatchFeatureTransformer
from sk_padim.files import atomic_file
from sk_padim.persistence import load_model
from sk_padim.plotting import check_matplotlib, heatmap_writer, picture_names, save_heatmaps

# Errors that come from the user's inputs; they are reported on one line. Anything
# else is a bug and keeps its traceback.
_USER_ERRORS = (OSError, ValueError, TypeError, ImportError, RuntimeError)
_SCORE_CHUNK = 256  # images scored at once: bounds the memory of features and maps
_FEATURE_DEFAULTS = PatchFeatureTransformer().get_params()
_MASK_SUFFIX = "_mask.png"
# A library parameter in an error message, ``name=value``: the command line says
# ``--name value`` instead (see _command_line_spelling).
_PARAMETER = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(=(?:'([^']*)'|(None)\b)?)?")


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
        message = _command_line_spelling(one_line(error), args)
        print(f"sk-padim {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _command_line_spelling(message: str, args: argparse.Namespace) -> str:
    """The message with the library's parameters spelt as this command's options.

    For the parameters the command has as options, ``weights=None`` becomes ``--weights
    none``, ``backbone='efficientnet_lite0'`` becomes ``--backbone efficientnet_lite0``
    and a bare ``image_size`` (a name with an underscore cannot be a plain word) becomes
    ``--image-size``; other text is left alone.
    """
    options = set(vars(args)) - {"command", "run", "parser"}

    def option(match: re.Match) -> str:
        name, assignment, quoted, none = match.groups()
        if name not in options or not (assignment or "_" in name):
            return match[0]
        flag = "--" + name.replace("_", "-")
        if not assignment:
            return flag
        return f"{flag} {quoted if quoted is not None else ('none' if none else '')}"

    return _PARAMETER.sub(option, message)


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
    _add_calibrate(commands, [common])
    _add_export(commands, [common])
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
        help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...; downloaded on first use), "
        "a state-dict file, or 'none' for random weights (default: %(default)s)",
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
        "joblib. The default backbone, resnet18, downloads its weights on first use; "
        f"offline, use --backbone {DEMO_BACKBONE} or --weights FILE. Load only model "
        "files you trust: loading runs code.",
    )
    parser.add_argument(
        "images",
        help="a folder of normal images (sub-folders are not searched), or an MVTec AD "
        "category folder (its train/good is used)",
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
        description="Score images with a model from 'sk-padim fit' or 'sk-padim calibrate'. "
        "Writes a CSV with one row per image: image, score (higher = more anomalous, 6 "
        "significant digits) and, when there is a threshold, label: 'anomalous' when "
        "score >= threshold, else 'normal'.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit' or 'calibrate'")
    parser.add_argument(
        "images",
        nargs="+",
        help="image files and/or folders of images (sub-folders included, e.g. an MVTec "
        "AD test/ folder)",
    )
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
        "(default: the model's threshold: calibrated by 'sk-padim calibrate', else the "
        "one 'fit' sets from the training images)",
    )
    parser.add_argument(
        "--device", help="run on this device instead of the model's (auto, cpu, cuda)"
    )
    parser.set_defaults(run=_score, parser=parser)


def _add_calibrate(commands, parents) -> None:
    parser = commands.add_parser(
        "calibrate",
        parents=parents,
        help="choose a model's threshold for the best F1 on labelled images",
        description="Choose the threshold with the best F1 on images of normal and of "
        "defective parts (F1ThresholdCalibrator) and save the calibrated model, which "
        "'sk-padim score' then labels with. Images are labelled per image, or per pixel "
        "with --masks. Prints the threshold and its F1, precision and recall; these are "
        "measured on the images that chose the threshold, so expect less on new images.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit'")
    parser.add_argument(
        "--good", nargs="+", required=True, help="images of normal parts: files and/or folders"
    )
    parser.add_argument(
        "--bad",
        nargs="+",
        required=True,
        help="images of defective parts: files and/or folders (sub-folders included)",
    )
    parser.add_argument(
        "--masks",
        help="folder of the defect masks of the --bad images, mirroring their folders below "
        "the folder common to them (an MVTec AD ground_truth/); calibrates on pixels",
    )
    _add_mask_suffix(parser)
    parser.add_argument("-o", "--output", required=True, help="calibrated model file to write")
    parser.add_argument(
        "--device", help="run on this device instead of the model's (auto, cpu, cuda)"
    )
    parser.set_defaults(run=_calibrate)


def _add_export(commands, parents) -> None:
    parser = commands.add_parser(
        "export",
        parents=parents,
        help="write a model as one ONNX file, for scoring without Python",
        description="Write a fitted (or calibrated) model as one ONNX file: uint8 images "
        "(batch, H, W, 3) at the model's image size in; the anomaly map, the image score "
        "and, when the model has a threshold, the verdict out. See docs/export.md.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit' or 'calibrate'")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--float16",
        action="store_true",
        help="store the Gaussians and the backbone's weights in half precision (half the size)",
    )
    parser.set_defaults(run=_export)


def _add_evaluate(commands, parents) -> None:
    parser = commands.add_parser(
        "evaluate",
        parents=parents,
        help="fit and evaluate per category of an MVTec AD-layout dataset",
        description="For each category of a dataset in the MVTec AD layout, fit PaDiM on "
        "train/good and evaluate it on test/: prints image AUROC, pixel AUROC, AUPRO and "
        "times, and writes them to OUTPUT/results.csv and OUTPUT/results.md. A category "
        "found under ROOT that cannot be evaluated (no test images or masks) is skipped "
        "with a warning.",
    )
    parser.add_argument(
        "root",
        help="a dataset folder holding <category>/train/good, test, ground_truth, or one "
        "category folder",
    )
    parser.add_argument(
        "--categories", nargs="+", help="categories to evaluate (default: every one under ROOT)"
    )
    _add_mask_suffix(parser)
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


def _add_mask_suffix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mask-suffix",
        default=_MASK_SUFFIX,
        help="what follows an image's name in its mask's file name, e.g. .png for BTAD "
        "(default: %(default)s)",
    )


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
    output = _dump(pipeline, Path(args.output))
    _info(args, f"Fitted on {len(images)} images from {source} in {seconds:.1f} s; wrote {output}.")


def _score(args: argparse.Namespace, progress: bool) -> None:
    if args.heatmaps and args.output is None:
        args.parser.error("--heatmaps needs -o/--output DIR to write the pictures to")
    if args.heatmaps:
        check_matplotlib("sk-padim score --heatmaps")
    pipeline, threshold, source = _scoring_model(_load_model(Path(args.model)))
    if args.threshold is not None:
        threshold, source = args.threshold, "given (--threshold)"
    if args.device is not None:
        _set_device(pipeline, args.device)
    paths = _image_files(args.images)
    header = ["image", "score"] + ([] if threshold is None else ["label"])
    chunks = _scored_chunks(pipeline, paths, threshold, progress)
    if args.output is None:
        _write_csv(lambda: sys.stdout, header, chunks)
        return
    output = Path(args.output)
    csv_path = output / "scores.csv"
    if args.heatmaps:
        chunks = _with_heatmaps(chunks, paths, output / "heatmaps", threshold, source)
    with contextlib.ExitStack() as files:
        output.mkdir(parents=True, exist_ok=True)
        _write_csv(lambda: files.enter_context(_atomic_text(csv_path)), header, chunks)
    _info(args, f"Scored {len(paths)} images; wrote {csv_path}.")


def _scored_chunks(pipeline, paths: list[str], threshold: float | None, progress: bool):
    """Score the images a chunk at a time; yield ``(chunk, maps, rows)`` for the CSV."""
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), _SCORE_CHUNK):
            chunk = paths[start : start + _SCORE_CHUNK]
            maps, scores = maps_and_scores(pipeline, chunk)
            rows = [[path, f"{score:.6g}"] for path, score in zip(chunk, scores, strict=True)]
            if threshold is not None:
                for row, score in zip(rows, scores, strict=True):
                    row.append("anomalous" if score >= threshold else "normal")
            yield chunk, maps, rows
            bar.update(len(chunk))


def _with_heatmaps(chunks, paths, folder: Path, threshold, source):
    """Pass the chunks on after writing their pictures, named by ``picture_names``.

    The pictures share one colour scale, from the median to the maximum of the first
    chunk's maps.
    """
    names = iter(picture_names(paths))
    scale = None
    for chunk, maps, rows in chunks:
        scale = scale or (float(np.median(maps)), float(maps.max()))
        save_heatmaps(
            chunk,
            maps,
            folder,
            threshold=threshold,
            threshold_source=source,
            names=[next(names) for _ in chunk],
            vmin=scale[0],
            vmax=scale[1],
        )
        yield chunk, maps, rows


def _write_csv(open_file, header: list[str], chunks) -> None:
    """Write the rows of the chunks; the file is opened and the header written once the
    first chunk is scored, so that nothing is written when nothing could be scored."""
    writer = None
    for _, _, rows in chunks:
        if writer is None:
            writer = csv.writer(open_file(), lineterminator="\n")
            writer.writerow(header)
        writer.writerows(rows)


def _calibrate(args: argparse.Namespace, progress: bool) -> None:
    pipeline, _, _ = _scoring_model(_load_model(Path(args.model)))
    if args.device is not None:
        _set_device(pipeline, args.device)
    good, bad = _image_files(args.good), _image_files(args.bad)
    if args.masks is None:
        level, truth = "image", np.repeat([0, 1], [len(good), len(bad)])
    else:
        level, truth = "pixel", _calibration_masks(good, bad, args)
    calibrator = F1ThresholdCalibrator(pipeline, level=level).fit(good + bad, truth)
    output = _dump(calibrator, Path(args.output))
    on = "on" if level == "image" else "on the pixels of"
    print(
        f"threshold {calibrator.threshold_:.6g} ({level} level; anomalous when the score is "
        f">= it)\nF1 {calibrator.best_score_:.3f}, precision {calibrator.precision_:.3f}, "
        f"recall {calibrator.recall_:.3f} {on} {len(good)} good and {len(bad)} bad images "
        "(measured on the images that chose the threshold)"
    )
    _info(args, f"Wrote {output}; score with: sk-padim score {output} <images>")


def _export(args: argparse.Namespace, progress: bool) -> None:
    path = export_onnx(_load_model(Path(args.model)), args.output, float16=args.float16)
    size = path.stat().st_size + sum(
        extra.stat().st_size for extra in path.parent.glob(path.name + ".data")
    )
    print(f"Wrote {path} ({size / 2**20:.1f} MiB)")


def _calibration_masks(good: list[str], bad: list[str], args: argparse.Namespace) -> np.ndarray:
    """Pixel masks of the good (all False) and bad images, one array."""
    bad_masks = load_masks(bad, args.masks, mask_suffix=args.mask_suffix)
    if isinstance(bad_masks, list):
        raise ValueError(
            "The --bad images differ in size; pixel calibration from the command line needs "
            "images of one size. Leave out --masks to calibrate per image."
        )
    good_masks = np.zeros((len(good), *bad_masks.shape[1:]), dtype=bool)
    return np.concatenate([good_masks, bad_masks])


def _evaluate(args: argparse.Namespace, progress: bool) -> None:
    root, found = _mvtec_categories(Path(args.root))
    names = _evaluable(args, root, args.categories or found, explicit=bool(args.categories))
    if args.n_heatmaps:
        check_matplotlib("sk-padim evaluate --n-heatmaps")
    pictures = Path(args.output) / "heatmaps"
    results = evaluate(
        _pipeline(args, progress),
        names,
        lambda name: load_mvtec_category(root, name, mask_suffix=args.mask_suffix),
        output=args.output,
        on_scored=heatmap_writer(pictures, args.n_heatmaps) if args.n_heatmaps else None,
        progress=progress,
    )
    print(results_table(results))
    _info(args, _written(Path(args.output), args.n_heatmaps))


def _evaluable(args: argparse.Namespace, root: Path, names, explicit: bool) -> list[str]:
    """The categories that can be evaluated, checked before the first fit.

    A category the user named must be complete; one found by the scan is skipped with a
    warning if its images or masks are missing.
    """
    usable = []
    for name in names:
        try:
            load_mvtec_ad(root, name, return_X_y=True)
            load_mvtec_ad(root, name, split="test", mask_suffix=args.mask_suffix)
        except (OSError, ValueError) as error:
            if explicit:
                raise
            _warn(args, f"skipping category {name}: {one_line(error)}")
        else:
            usable.append(name)
    if not usable:
        raise FileNotFoundError(f"No category under {root} can be evaluated (see the warnings).")
    return usable


def _demo(args: argparse.Namespace, progress: bool) -> None:
    if args.n_heatmaps:
        check_matplotlib("sk-padim demo (pass --n-heatmaps 0 to skip the pictures)")
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
        raise FileNotFoundError(
            f"Folder not found: {folder}. Pass a folder of normal images, or an MVTec AD "
            "category folder."
        )
    root, names = find_mvtec_categories(folder)
    if root != folder:  # a category folder
        images, _ = load_mvtec_ad(root, folder.name, return_X_y=True)
        return images, folder / "train" / "good"
    if names:
        raise ValueError(
            f"{folder} holds the categories {', '.join(names)}; fit one at a time, e.g. "
            f"sk-padim fit {folder / names[0]} -o {names[0]}.joblib"
        )
    return list_images(folder), folder


def _image_files(inputs: Sequence[str]) -> list[str]:
    """Image files given directly or inside the given folders (sub-folders included), in
    the order given; the paths keep the form they were given in."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += list_images(item, recursive=True)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise FileNotFoundError(f"No such image file or folder: {item}.")
    return paths


@contextlib.contextmanager
def _atomic_text(path: Path):
    """A text file (for ``csv``) that appears at ``path`` only once fully written."""
    with atomic_file(path) as file, io.TextIOWrapper(file, newline="") as text:
        yield text


def _dump(model, output: Path) -> Path:
    """Write a model file with joblib, whole or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as file:
        joblib.dump(model, file)
    return output


def _load_model(path: Path):
    if not path.is_file():
        raise FileNotFoundError(
            f"Model file not found: {path}. Make one with: sk-padim fit <images> -o {path}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path)
    for warning in caught:
        print(f"sk-padim: warning: {one_line(warning.message)}", file=sys.stderr)
    return model


def _scoring_model(model) -> tuple[Pipeline, float | None, str | None]:
    """The fitted image pipeline inside a loaded model, its threshold and where that came
    from: a calibrator's F1-optimal one, else the detector's own (None if unset)."""
    if isinstance(model, F1ThresholdCalibrator):
        check_is_fitted(model)
        source = f"calibrated, best {model.level} F1"
        model, threshold = model.estimator_, model.threshold_
    else:
        threshold, source = None, None
    is_image_model = (
        isinstance(model, Pipeline)
        and len(model.steps) > 1
        and all(hasattr(model[-1], name) for name in ("score_samples", "decision_function"))
    )
    if not is_image_model:
        raise TypeError(
            f"The model file holds a {type(model).__name__}, not an image model. Save a "
            "Pipeline of PatchFeatureTransformer and PadimDetector ('sk-padim fit' makes "
            "one), or an F1ThresholdCalibrator wrapping one ('sk-padim calibrate')."
        )
    check_is_fitted(model[-1])
    if threshold is None and getattr(model[-1], "threshold_", None) is not None:
        threshold, source = model[-1].threshold_, "the model's own"
    return model, threshold, source


def _set_device(pipeline: Pipeline, device: str) -> None:
    for step in pipeline.named_steps.values():
        if "device" in step.get_params(deep=False):
            step.set_params(device=device)


def _mvtec_categories(folder: Path) -> tuple[Path, list[str]]:
    """The dataset root and its categories: ``folder``'s, or ``folder`` itself if it is one."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Dataset folder not found: {folder}.")
    root, names = find_mvtec_categories(folder)
    if not names:
        raise FileNotFoundError(
            f"No category in the MVTec AD layout under {folder}: expected "
            f"{folder}/<category>/train/good. Pass the dataset's root folder or a "
            "category folder."
        )
    return root, names


def _written(output: Path, n_heatmaps: int) -> str:
    pictures = f" and heat maps in {output / 'heatmaps'}" if n_heatmaps else ""
    return f"Wrote {output / 'results.csv'}, {output / 'results.md'}{pictures}."


def _info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _warn(args: argparse.Namespace, message: str) -> None:
    message = _command_line_spelling(message, args)
    print(f"sk-padim {args.command}: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
