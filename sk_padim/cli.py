"""The ``sk-padim`` command: ``fit``, ``score``, ``calibrate``, ``export``, ``info``,
``evaluate`` and ``demo``.

Run ``sk-padim --help`` or ``sk-padim <command> --help``. Results (tables, CSV without
``-o``) go to standard output; messages and progress bars go to standard error.
Progress bars show when standard error is a terminal, or with ``--verbose``.

Exit codes: 0 success; 1 an error in the inputs (missing folder, unreadable image,
model file from an incompatible version, ...), reported on one line; 2 a wrong
command line; 130 interrupted. An image is anomalous when its score is ``>=`` the
threshold, as for ``PadimDetector.predict`` and ``F1ThresholdCalibrator``.

The command calls the library's public functions only: image discovery
(:func:`~sk_padim.datasets.list_images`), the MVTec AD scan, the evaluation harness,
the regions and the pictures all live in the library. The library (torch, scikit-learn)
is imported inside the commands, so that ``sk-padim --help`` answers at once.

``sk-padim score -o DIR`` writes each result as it is made
(``sk_padim.score_run.ScoreRun``). Ctrl-C is caught by a handler installed for the
command's run only (``_Interrupts``), which sets a flag checked between images, so that
no interrupt is lost, even one that lands in a weak-reference callback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sk_padim._checks import one_line
from sk_padim.cli_parser import DEMO_BACKBONE, build_parser

__all__ = ["main"]

# The library is imported inside the commands (torch takes seconds to import), so that
# ``sk-padim --help`` and usage errors answer at once.

# Errors that come from the user's inputs; they are reported on one line. Anything
# else is a bug and keeps its traceback.
_USER_ERRORS = (OSError, ValueError, TypeError, ImportError, RuntimeError)
_CSV_HEADER = ["image", "score", "p_value", "relative", "normalized", "label"]
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
    args = build_parser().parse_args(argv)
    progress = args.verbose or (not args.quiet and sys.stderr.isatty())
    args.interrupted = lambda: ""  # what a command has saved, said when interrupted
    try:
        _COMMANDS[args.command](args, progress)
    except KeyboardInterrupt:
        code = 130
        print(f"sk-padim {args.command}: interrupted{args.interrupted()}", file=sys.stderr)
    except _USER_ERRORS as error:
        if args.verbose:
            traceback.print_exc()
        message = _command_line_spelling(one_line(error), args)
        print(f"sk-padim {args.command}: error: {message}", file=sys.stderr)
        code = 1
    else:
        code = 0
    if argv is None:  # the command itself, not a call from Python
        _exit_quietly_on_interrupt(args.command)
    return code


def _exit_quietly_on_interrupt(command: str) -> None:
    """From here to the end of the process, Ctrl-C ends it with one line, by SIGINT.

    An interrupt while Python shuts down (threads joined, objects finalised) would
    otherwise print ``Exception ignored in ...`` and exit with 0. The outputs are
    closed by now, so leaving at once loses nothing; the shell reports 130.
    """
    sys.stdout.flush()
    sys.stderr.flush()

    def leave(signum, frame):
        with contextlib.suppress(OSError, ValueError):
            os.write(2, f"sk-padim {command}: interrupted\n".encode())
        # End by the signal itself, as a program without a handler would: the shell
        # reports 130 (128 + SIGINT), and a calling script sees the interrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, leave)


def _command_line_spelling(message: str, args: argparse.Namespace) -> str:
    """The message with the library's parameters spelt as this command's options.

    For the parameters the command has as options, ``weights=None`` becomes ``--weights
    none``, ``backbone='efficientnet_lite0'`` becomes ``--backbone efficientnet_lite0``
    and a bare ``image_size`` (a name with an underscore cannot be a plain word) becomes
    ``--image-size``; other text is left alone.
    """
    options = set(vars(args)) - {"command", "parser"}

    def option(match: re.Match) -> str:
        name, assignment, quoted, none = match.groups()
        if name not in options or not (assignment or "_" in name):
            return match[0]
        flag = "--" + name.replace("_", "-")
        if not assignment:
            return flag
        return f"{flag} {quoted if quoted is not None else ('none' if none else '')}"

    return _PARAMETER.sub(option, message)


def _fit(args: argparse.Namespace, progress: bool) -> None:
    from sk_padim.conformal import SuspectTrainingImagesWarning

    images, source = _training_images(Path(args.images).resolve())
    pipeline = _pipeline(args, progress)
    detector = pipeline[-1].set_params(false_alarm_rate=args.false_alarm_rate)
    start = time.perf_counter()
    kept, refit_suspects = images, []
    with _warnings_on_one_line(args, ignore=SuspectTrainingImagesWarning):
        # Pipeline.fit's two steps, with the features kept for a refit without suspects.
        features = pipeline[0].fit_transform(images)
        detector.fit(features)
        suspects = _suspect_files(detector, images)
        if suspects and args.exclude_suspects:
            detector.fit(features, _suspect_labels(detector, len(images)))
            kept = [path for path in images if path not in set(suspects)]
            refit_suspects = _suspect_files(detector, kept)
    del features
    seconds = time.perf_counter() - start
    if suspects:
        _warn(args, _suspects_message(suspects, len(images), args.exclude_suspects))
        if args.exclude_suspects and refit_suspects:
            _warn(args, "after the refit, " + _suspects_message(refit_suspects, len(kept), False))
    pipeline.set_params(feat__verbose=False)  # the saved model stays quiet
    output = _dump(pipeline, Path(args.output))
    _info(args, f"Fitted on {len(kept)} images from {source} in {seconds:.1f} s; wrote {output}.")
    if hasattr(detector, "threshold_"):
        _info(args, f"Image threshold {detector.threshold_:.6g}: {_rule_text(detector)}.")


def _suspect_files(detector, images: list[str]) -> list[str]:
    """The files of the detector's suspect training images."""
    return [images[i] for i in getattr(detector, "suspect_indices_", ())]


def _suspect_labels(detector, n_images: int):
    """Image labels with the suspects as anomalous: ``fit(X, y)`` leaves them out."""
    import numpy as np

    labels = np.zeros(n_images, dtype=int)
    labels[detector.suspect_indices_] = 1
    return labels


def _suspects_message(files: list[str], n_images: int, excluded: bool) -> str:
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    action = (
        "they were left out and the model refitted on the others"
        if excluded
        else "look at them, and refit with --exclude-suspects to leave them out"
    )
    return (
        f"{len(files)} of {n_images} training images score as outliers among the training "
        f"images, perhaps defective parts: {shown}; {action}."
    )


def _rule_text(detector) -> str:
    """How the detector's image threshold was set, in words."""
    rule = getattr(detector, "threshold_rule_", None)
    if rule is None:
        return "set by a version of sk-padim that did not record how"
    n, implied = rule["n_training_images"], rule["implied_false_alarm_rate"]
    promise = "" if implied is None else f"; flags at most {implied:.3g} of good images"
    if rule["rule"] == "false_alarm_rate":
        return (
            f"false-alarm rate {rule['false_alarm_rate']:g}, a held-out score of the {n} "
            f"training images (conformal rank){promise}"
        )
    if rule["rule"] == "highest_training_score":
        return f"the highest held-out score of the {n} training images{promise} (1/(n+1))"
    return f"given (threshold parameter){promise}"


@dataclass
class _Thresholds:
    """A loaded model's image threshold, its pixel threshold, where they came from, and
    the training images' held-out scores they are compared with (None where unknown)."""

    image: float | None
    image_source: str | None
    pixel: float | None
    pixel_source: str | None
    training_scores: object = None


def _score(args: argparse.Namespace, progress: bool) -> None:
    with _Interrupts().installed() as interrupts:
        _score_images(args, progress, interrupts)


def _score_images(args: argparse.Namespace, progress: bool, interrupts: _Interrupts) -> None:
    for flag in ("heatmaps", "regions", "resume"):
        if getattr(args, flag) and args.output is None:
            args.parser.error(f"--{flag} needs -o/--output DIR to write to")
    if args.heatmaps:
        from sk_padim.plotting import check_matplotlib

        check_matplotlib("sk-padim score --heatmaps")
    pipeline, thresholds = _scoring_model(_load_model(Path(args.model)))
    if args.threshold is not None:
        thresholds.image, thresholds.image_source = args.threshold, "given (--threshold)"
    if args.false_alarm_rate is not None:
        from sk_padim.conformal import conformal_threshold

        if thresholds.training_scores is None:
            raise ValueError(
                "--false-alarm-rate needs the training images' held-out scores, which this "
                "model does not keep (fitted before sk-padim kept them, or with partial_fit). "
                "Refit it with sk-padim fit, or pass --threshold."
            )
        rate = args.false_alarm_rate
        thresholds.image = conformal_threshold(thresholds.training_scores, rate)
        thresholds.image_source = f"false-alarm rate {rate:g} (given, --false-alarm-rate)"
    if args.pixel_threshold is not None:
        thresholds.pixel, thresholds.pixel_source = args.pixel_threshold, "given"
    for value, flag in ((thresholds.image, "--threshold"), (thresholds.pixel, "--pixel-threshold")):
        if value is not None and not value > 0:
            raise ValueError(f"The threshold must be positive; got {flag} {value}.")
    if args.regions and thresholds.pixel is None:
        raise ValueError(
            "--regions needs a pixel threshold, and the model has none (fit sets one from "
            "two training images or more). Pass --pixel-threshold, or calibrate one on good "
            f"images: sk-padim calibrate {args.model} --good <folder> -o <calibrated model>"
        )
    if thresholds.image is None:
        _warn(
            args,
            "the model has no threshold (fit sets one from two training images or more), so "
            "the label, relative and normalized columns are left empty. Pass --threshold, "
            f"or calibrate one: sk-padim calibrate {args.model} --good <folder> --bad <folder> "
            "-o <calibrated model>",
        )
    if args.device is not None:
        _set_device(pipeline, args.device)
    _set_speed(pipeline, args)
    paths = _image_files(args.images)
    header = _CSV_HEADER + (["regions"] if args.regions else [])
    from sk_padim.score_run import ScoreRun

    run = ScoreRun(
        args,
        pipeline,
        thresholds,
        paths,
        header,
        info=lambda message: _info(args, message),
        warn=lambda message: _warn(args, message),
    )
    args.interrupted = run.interrupted
    interrupts.check()  # one that came while the model loaded, if it was swallowed
    run.start()
    with interrupts.deferred():  # from here, a Ctrl-C stops the run between images
        failures = run.score(progress, interrupts.check)
        run.finish(failures)


class _Interrupts:
    """Ctrl-C for the duration of a command: a handler that sets a flag, which the
    command checks between images (:meth:`check`), so that no interrupt is lost.

    Python's own handler raises ``KeyboardInterrupt`` wherever the main thread is; when
    that is inside a weak-reference callback (torch runs many), the exception is printed
    as ``Exception ignored in ...`` and dropped, and the run went on. While
    :meth:`deferred` is active the handler only sets the flag; elsewhere it also raises
    at once (so that loading a model stops promptly). The previous handler is put back
    when the block ends. Outside the main thread, or when SIGINT is ignored, nothing is
    installed.
    """

    def __init__(self):
        self.received = False
        self.deferring = False

    @contextlib.contextmanager
    def installed(self):
        main_thread = threading.current_thread() is threading.main_thread()
        if not main_thread or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def deferred(self):
        """Only set the flag in the block; raise at its end if it was set."""
        deferring, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = deferring
        self.check()

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        self.received = True
        if not self.deferring:
            raise KeyboardInterrupt


def _calibrate(args: argparse.Namespace, progress: bool) -> None:
    from sk_padim.calibration import F1ThresholdCalibrator, QuantileThresholdCalibrator

    pipeline, _ = _scoring_model(_load_model(Path(args.model)))
    if args.device is not None:
        _set_device(pipeline, args.device)
    good = _image_files(args.good)
    if args.bad is None:
        if args.masks is not None:
            raise ValueError("--masks are the masks of the --bad images; pass --bad too.")
        if not 0 < args.quantile < 1:
            raise ValueError(f"--quantile must be in (0, 1), e.g. 0.999; got {args.quantile}.")
        calibrator = QuantileThresholdCalibrator(pipeline, quantile=args.quantile).fit(good)
        output = _dump(calibrator, Path(args.output))
        print(
            f"pixel threshold {calibrator.pixel_threshold_:.6g} (the {args.quantile:g} "
            f"quantile of the pixels of {len(good)} good images: about "
            f"{100 * (1 - args.quantile):.3g} % of good pixels are at or above it; "
            f"{100 * calibrator.false_positive_rate_:.3g} % of these images' pixels)\n"
            "image threshold "
            + (
                "unset (the model has none)"
                if calibrator.threshold_ is None
                else f"{calibrator.threshold_:.6g} (the model's own, unchanged)"
            )
        )
        _info(args, f"Wrote {output}; score with: sk-padim score {output} <images> --regions")
        return
    bad = _image_files(args.bad)
    _check_apart(good, bad)
    if args.masks is None:
        import numpy as np

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


def _check_apart(good: list[str], bad: list[str]) -> None:
    """Refuse files given as both classes."""
    both = set(map(os.path.realpath, good)) & set(map(os.path.realpath, bad))
    if both:
        example = sorted(both)[0]
        raise ValueError(
            f"{len(both)} image files are given both as --good and as --bad (e.g. {example}); "
            "each image must be in one class. Pass the folders of normal and of defective "
            "images."
        )


def _export(args: argparse.Namespace, progress: bool) -> None:
    from sk_padim.export import export_onnx

    path = export_onnx(_load_model(Path(args.model)), args.output, float16=args.float16)
    size = path.stat().st_size + sum(
        extra.stat().st_size for extra in path.parent.glob(path.name + ".data")
    )
    print(f"Wrote {path} ({size / 2**20:.1f} MiB)")


def _info_command(args: argparse.Namespace, progress: bool) -> None:
    model = _load_model(Path(args.model))
    pipeline, thresholds = _scoring_model(model)
    print("\n".join(_model_description(model, pipeline, thresholds)))


def _model_description(model, pipeline, thresholds: _Thresholds) -> list[str]:
    """``sk-padim info``'s lines."""
    import numpy as np

    feat, detector = pipeline[0], pipeline[-1]
    steps = ", ".join(f"{name}={type(step).__name__}" for name, step in pipeline.steps)
    wrapped = "" if model is pipeline else f"{type(model).__name__} around "
    size = getattr(feat, "image_size_", getattr(feat, "image_size", None))
    lines = [
        f"model: {wrapped}Pipeline({steps})",
        f"backbone: {getattr(feat, 'backbone', '?')}, layers "
        f"{','.join(getattr(feat, 'layers_', ()) or ())}, d={detector.n_features_in_}, "
        f"image size {size}, feature grid {tuple(detector.feature_shape_[1:])}",
        f"training images: {getattr(detector, 'n_samples_seen_', '?')}"
        + (f" (samples: tiles of {detector.texture_tile})" if detector.texture_tile else ""),
    ]
    if thresholds.image is None:
        lines.append("image threshold: none (fit sets one from two training images or more)")
    else:
        lines.append(f"image threshold: {thresholds.image:.6g} ({thresholds.image_source})")
        if thresholds.image_source == "the model's own":
            lines.append(f"  rule: {_rule_text(detector)}")
    if thresholds.pixel is None:
        lines.append("pixel threshold: none")
    else:
        rule = getattr(detector, "threshold_rule_", {}) or {}
        quantile = rule.get("pixel_quantile")
        how = thresholds.pixel_source
        if how == "the model's own" and quantile is not None:
            how = f"quantile {quantile:g} of the held-out training maps' pixels"
        lines.append(f"pixel threshold: {thresholds.pixel:.6g} ({how})")
    training = thresholds.training_scores
    if training is None:
        lines.append("training scores: not kept (refit to keep them)")
    else:
        low, median, high = np.percentile(training, [0, 50, 100])
        lines.append(
            f"training scores (held out, {len(training)} images): min {low:.6g}, "
            f"median {median:.6g}, max {high:.6g}"
        )
        suspects = list(getattr(detector, "suspect_indices_", ()))
        named = ", ".join(map(str, suspects)) if suspects else "none"
        lines.append(f"suspect training images (indices): {named}")
    return lines


def _calibration_masks(good: list[str], bad: list[str], args: argparse.Namespace):
    """Pixel masks of the good (all False) and bad images, one array."""
    import numpy as np

    from sk_padim.datasets import load_masks

    bad_masks = load_masks(bad, args.masks, mask_suffix=args.mask_suffix)
    if isinstance(bad_masks, list):
        raise ValueError(
            "The --bad images differ in size; pixel calibration from the command line needs "
            "images of one size. Leave out --masks to calibrate per image."
        )
    good_masks = np.zeros((len(good), *bad_masks.shape[1:]), dtype=bool)
    return np.concatenate([good_masks, bad_masks])


def _evaluate(args: argparse.Namespace, progress: bool) -> None:
    from sk_padim.datasets import load_mvtec_category
    from sk_padim.evaluation import evaluate, results_table
    from sk_padim.heatmaps import heatmap_writer
    from sk_padim.plotting import check_matplotlib

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
    from sk_padim.datasets import load_mvtec_ad

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
    from sk_padim.demo import run_demo
    from sk_padim.evaluation import results_table
    from sk_padim.plotting import check_matplotlib

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
        **_speed_params(args),
    )
    print(results_table(results))
    seconds = time.perf_counter() - start
    print(f"\nTotal {seconds:.1f} s. {_written(Path(args.output), args.n_heatmaps)}")


# ------------------------------------------------------------------------ helpers


def _pipeline(args: argparse.Namespace, progress: bool):
    from sk_padim.evaluation import padim_pipeline

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
        **_speed_params(args),
    )


def _speed_params(args: argparse.Namespace) -> dict:
    """``--precision`` and ``--runtime`` as transformer parameters, those given."""
    given = {"precision": args.precision, "runtime": args.runtime}
    return {name: value for name, value in given.items() if value is not None}


def _set_speed(pipeline, args: argparse.Namespace) -> None:
    """Run the model's backbone with ``--precision`` / ``--runtime``, when given."""
    params = _speed_params(args)
    if params:
        pipeline.steps[0][1].set_params(**params)


def _training_images(folder: Path) -> tuple[list[str], Path]:
    """The images of a folder, or of ``train/good`` in an MVTec AD category folder."""
    from sk_padim.datasets import find_mvtec_categories, list_images, load_mvtec_ad

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
    from sk_padim.datasets import list_images

    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += list_images(item, recursive=True)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise FileNotFoundError(f"No such image file or folder: {item}.")
    return paths


def _dump(model, output: Path) -> Path:
    """Write a model file and its checksum (:func:`sk_padim.save_model`), each whole or
    not at all."""
    from sk_padim.persistence import save_model

    output.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, output)
    return output


def _load_model(path: Path):
    from sk_padim.persistence import load_model

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


@contextlib.contextmanager
def _warnings_on_one_line(args: argparse.Namespace, ignore: type[Warning] | None = None):
    """The library's warnings during the block, each said on one line at its end (those
    of the category ``ignore`` left out: the command says them its own way)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ignore is not None:
            warnings.simplefilter("ignore", ignore)
        yield
    for warning in caught:
        _warn(args, one_line(warning.message))


def _scoring_model(model):
    """The fitted image pipeline inside a loaded model, and its thresholds: a
    calibrator's, else the detector's own (None where unset)."""
    from sklearn.utils.validation import check_is_fitted

    from sk_padim.calibration import F1ThresholdCalibrator, QuantileThresholdCalibrator
    from sk_padim.pipelines import padim_steps

    thresholds = _Thresholds(None, None, None, None)
    if isinstance(model, F1ThresholdCalibrator):
        check_is_fitted(model)
        thresholds.image = model.threshold_
        thresholds.image_source = f"calibrated, best {model.level} F1"
        if model.level == "pixel":
            thresholds.pixel, thresholds.pixel_source = model.threshold_, "best pixel F1"
        model = model.estimator_
    elif isinstance(model, QuantileThresholdCalibrator):
        check_is_fitted(model)
        thresholds.pixel = model.pixel_threshold_
        thresholds.pixel_source = f"quantile {model.quantile:g} of good pixels"
        model = model.estimator_
    try:
        padim_steps(model, "sk-padim", fitted=True)
    except TypeError:
        raise TypeError(
            f"The model file holds a {type(model).__name__}, not an image model. Save a "
            "Pipeline of PatchFeatureTransformer and PadimDetector ('sk-padim fit' makes "
            "one), or a calibrator wrapping one ('sk-padim calibrate')."
        ) from None
    if thresholds.image is None and getattr(model[-1], "threshold_", None) is not None:
        thresholds.image, thresholds.image_source = model[-1].threshold_, "the model's own"
    if thresholds.pixel is None and getattr(model[-1], "pixel_threshold_", None) is not None:
        thresholds.pixel = model[-1].pixel_threshold_
        thresholds.pixel_source = "the model's own"
    if getattr(model[-1], "training_scores_", None) is not None:
        thresholds.training_scores = model[-1].training_scores_
    return model, thresholds


def _set_device(pipeline, device: str) -> None:
    for step in pipeline.named_steps.values():
        if "device" in step.get_params(deep=False):
            step.set_params(device=device)


def _mvtec_categories(folder: Path) -> tuple[Path, list[str]]:
    """The dataset root and its categories: ``folder``'s, or ``folder`` itself if it is one."""
    from sk_padim.datasets import find_mvtec_categories

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


# What runs each command that cli_parser.build_parser parses.
_COMMANDS = {
    "fit": _fit,
    "score": _score,
    "calibrate": _calibrate,
    "export": _export,
    "info": _info_command,
    "evaluate": _evaluate,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
