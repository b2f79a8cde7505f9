"""The ``sk-padim`` command line: the parser of every command, its options and the
argument types.

It imports nothing of the library (torch takes seconds to import), so that ``sk-padim
--help`` and usage errors answer at once; :mod:`sk_padim.cli` runs the commands.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sk_padim._version import __version__

__all__ = ["DEMO_BACKBONE", "build_parser"]

# PatchFeatureTransformer's defaults, for the help text without importing torch
# (tests/test_cli_outputs.py checks them against the class).
_FEATURE_DEFAULTS = {
    "backbone": "resnet18",
    "weights": "DEFAULT",
    "layers": None,
    "n_features": None,
    "image_size": 224,
    "batch_size": 32,
    "device": "auto",
}
DEMO_BACKBONE = "efficientnet_lite0"  # sk_padim.demo.DEMO_BACKBONE (checked by the tests)
# sk_padim.core.runtimes.PRECISIONS and RUNTIMES (checked by the tests): importing that module
# imports torch, which ``sk-padim --help`` does not wait for.
_PRECISIONS = ("float32", "bfloat16", "float16", "auto")
_RUNTIMES = ("eager", "openvino")
_MASK_SUFFIX = "_mask.png"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``sk-padim`` command line and of each of its commands.

    Returns
    -------
    parser : argparse.ArgumentParser
        ``parse_args`` gives the command's name as ``command`` and its options.

    Examples
    --------
    >>> from sk_padim.cli_parser import build_parser
    >>> args = build_parser().parse_args(["fit", "images/", "-o", "model.joblib"])
    >>> args.command, args.output, args.backbone
    ('fit', 'model.joblib', 'resnet18')
    """
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
    speed = _speed_options()
    _add_fit(commands, [common, model, speed])
    _add_score(commands, [common, speed])
    _add_calibrate(commands, [common])
    _add_export(commands, [common])
    _add_info(commands, [common])
    _add_evaluate(commands, [common, model, speed])
    _add_demo(commands, [common, speed])
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
        type=_image_size,
        default=defaults["image_size"],
        help="images are resized to N x N or H x W pixels (N or HxW), or kept at their own "
        "size with 'native' (the training images must then share one size, and the images "
        "scored too) (default: %(default)s)",
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


def _speed_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("backbone speed")
    group.add_argument(
        "--precision",
        choices=_PRECISIONS,
        help="precision the backbone runs in: float32 (exact), bfloat16, float16 (CUDA), or "
        "auto (bfloat16 where the hardware runs it natively, else float32) (default: "
        "float32, or the model's when scoring)",
    )
    group.add_argument(
        "--runtime",
        choices=_RUNTIMES,
        help="what runs the backbone: eager (PyTorch) or openvino (compiled for the CPU; "
        "needs sk-padim[openvino]) (default: eager, or the model's when scoring)",
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
    parser.add_argument(
        "--false-alarm-rate",
        type=_rate,
        help="set the image threshold so that at most this fraction of good images like "
        "the training ones is flagged, e.g. 0.01 (needs at least 1/RATE - 1 training "
        "images) (default: the highest held-out training score, which implies 1/(n+1))",
    )
    parser.add_argument(
        "--exclude-suspects",
        action="store_true",
        help="refit without the training images whose held-out score is an outlier among "
        "the training images' (named in a warning), reusing their features",
    )


def _add_score(commands, parents) -> None:
    parser = commands.add_parser(
        "score",
        parents=parents,
        help="score images with a fitted model",
        description="Score images with a model from 'sk-padim fit' or 'sk-padim calibrate'. "
        "Writes a CSV with one row per image: image, score (higher = more anomalous, 6 "
        "significant digits), p_value = (1 + training images scoring as high) / (n + 1) "
        "(about 1 in 1/p_value good images scores this high), relative = score / threshold "
        "(1 = on the line), normalized = score / (score + threshold) (0.5 = on the line; "
        "not a probability) and label: 'anomalous' when score >= threshold, else 'normal' "
        "(empty when the model has no threshold). With -o, each row is written as soon as "
        "its image is scored: an interrupted run keeps them, and --resume finishes it; at "
        "the end OUTPUT/summary.json holds the counts and a drift test of all the rows' "
        "scores against the training images' (a line is printed when it finds drift).",
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
        "--regions",
        action="store_true",
        help="also write OUTPUT/regions.jsonl, one JSON record per defect region (connected "
        "pixels of the map >= the pixel threshold): image, box, area, centroid, peak and "
        "mean score; the pictures draw the boxes",
    )
    parser.add_argument(
        "--min-area",
        type=_positive_int,
        default=1,
        help="with --regions, leave out regions of fewer pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of an existing OUTPUT/scores.csv (an interrupted run) and score "
        "only the images not in it, appending; run with the same options",
    )
    image_threshold = parser.add_mutually_exclusive_group()
    image_threshold.add_argument(
        "--threshold",
        type=float,
        help="label images whose score is >= THRESHOLD 'anomalous', others 'normal', for "
        "this run (default: the model's threshold: calibrated by 'sk-padim calibrate', else "
        "the one 'fit' sets from the training images)",
    )
    image_threshold.add_argument(
        "--false-alarm-rate",
        type=_rate,
        help="for this run, the threshold that flags at most this fraction of good images, "
        "from the model's training scores, e.g. 0.01",
    )
    parser.add_argument(
        "--pixel-threshold",
        type=float,
        help="cut the regions and the pictures' red panel at this pixel score (default: the "
        "model's: calibrated by 'sk-padim calibrate', else the one 'fit' sets)",
    )
    parser.add_argument(
        "--device", help="run on this device instead of the model's (auto, cpu, cuda)"
    )
    parser.set_defaults(parser=parser)  # the command reports its usage errors


def _add_calibrate(commands, parents) -> None:
    parser = commands.add_parser(
        "calibrate",
        parents=parents,
        help="choose a model's threshold: best F1 on labelled images, or from good images",
        description="Two routes. With --good and --bad: choose the threshold with the best "
        "F1 on images of normal and of defective parts (F1ThresholdCalibrator), per image, "
        "or per pixel with --masks; prints the threshold and its F1, precision and recall, "
        "measured on the images that chose it, so expect less on new images. With --good "
        "only: a pixel threshold (for regions) from good images the model was not fitted "
        "on, the --quantile of their pixels' scores (QuantileThresholdCalibrator): about "
        "1 - QUANTILE of good pixels are at or above it; the image threshold stays the "
        "model's. Saves the calibrated model, which 'sk-padim score' then uses.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit'")
    parser.add_argument(
        "--good",
        nargs="+",
        required=True,
        help="images of normal parts, not used to fit the model: files and/or folders",
    )
    parser.add_argument(
        "--bad",
        nargs="+",
        help="images of defective parts: files and/or folders (sub-folders included); "
        "without them, a pixel threshold is set from the --good images alone",
    )
    parser.add_argument(
        "--masks",
        help="folder of the defect masks of the --bad images, mirroring their folders below "
        "the folder common to them (an MVTec AD ground_truth/); calibrates on pixels",
    )
    parser.add_argument(
        "--quantile",
        type=float,
        default=0.999,
        help="without --bad: the quantile of the good pixels' scores taken as the pixel "
        "threshold, in (0, 1); 1 - QUANTILE is the false-positive pixel rate it implies "
        "(default: %(default)s)",
    )
    _add_mask_suffix(parser)
    parser.add_argument("-o", "--output", required=True, help="calibrated model file to write")
    parser.add_argument(
        "--device", help="run on this device instead of the model's (auto, cpu, cuda)"
    )


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


def _add_info(commands, parents) -> None:
    parser = commands.add_parser(
        "info",
        parents=parents,
        help="describe a model file: its steps, thresholds and how they were set",
        description="Print what a model file holds: the backbone, image size and features, "
        "the number of training images, the image threshold and how it was set (rule, "
        "false-alarm rate), the pixel threshold and its quantile, the range of the training "
        "images' held-out scores and the suspect training images.",
    )
    parser.add_argument("model", help="model file written by 'sk-padim fit' or 'calibrate'")


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


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a rate in (0, 1), e.g. 0.01; got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _image_size(text: str) -> int | tuple[int, int] | None:
    """``N``, ``HxW`` (height by width) or ``native`` (PatchFeatureTransformer's None)."""
    if text == "native":
        return None
    try:
        sides = [_positive_int(side) for side in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"must be N, HxW or native, got {text}")
    return sides[0] if len(sides) == 1 else tuple(sides)


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
