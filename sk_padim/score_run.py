"""The resumable writer of ``sk-padim score -o DIR``: its CSV, regions and pictures.

Images are scored a batch at a time (:func:`sk_padim.streaming.iter_scores`) and each
image's picture, regions and row of ``scores.csv`` (flushed) are written before the next
image's, each picture to a temporary name renamed into place; only one batch of maps is
held, whatever the number of images. An interrupted run keeps every completed row;
``--resume`` scores only the images not yet in ``scores.csv``. At the end,
``summary.json`` is written from all the rows of ``scores.csv``
(:func:`sk_padim.drift_report`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sk_padim._checks import one_line
from sk_padim.conformal import drift_report, p_values_from_scores
from sk_padim.files import atomic_file, output_names
from sk_padim.heatmaps import save_heatmaps
from sk_padim.regions import defect_regions, normalized_score, relative_score
from sk_padim.streaming import iter_scores

__all__ = ["ScoreRun"]

_SCORE_CHUNK = 256
"""At most this many images are scored at once (the transformer's ``batch_size`` when
smaller): bounds the features and maps held."""
_SUMMARY = "summary.json"


class ScoreRun:
    """One ``sk-padim score``: its outputs, written as the images are scored.

    ``args`` are the command's options (``output``, ``resume``, ``regions``,
    ``heatmaps``, ``min_area``); ``thresholds`` has the image and pixel thresholds, where
    the image threshold came from and the training images' held-out scores (attributes
    ``image``, ``image_source``, ``pixel``, ``training_scores``; None where unknown);
    ``header`` is the CSV's columns. ``info`` and ``warn`` say a message to the user.
    """

    def __init__(
        self,
        args,
        pipeline,
        thresholds,
        paths: list[str],
        header: list[str],
        *,
        info: Callable[[str], None],
        warn: Callable[[str], None],
    ):
        self.args, self.pipeline, self.thresholds = args, pipeline, thresholds
        self.info, self.warn = info, warn
        self.paths, self.header = paths, header
        self.output = None if args.output is None else Path(args.output)
        self.csv = self.regions = self.names = None
        self.kept: set[str] = set()  # the images of the CSV being resumed
        self.done: set[str] = set()  # those of them among the images to score
        self.written = 0  # rows written by this run
        self.scores: list[float] = []  # their scores
        self.scale = None  # the pictures' colour scale

    @property
    def csv_path(self) -> Path:
        return self.output / "scores.csv"

    @property
    def regions_path(self) -> Path:
        return self.output / "regions.jsonl"

    def start(self) -> None:
        """Open the outputs (the CSV itself once a first row is ready)."""
        if self.output is None:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / _SUMMARY).unlink(missing_ok=True)  # written again at the end
        if self.args.resume:
            self.kept = _completed_images(self.csv_path, self.header)
            self.done = self.kept & set(self.paths)
            if self.args.regions:
                _keep_regions_of(self.regions_path, self.kept)
        if self.args.heatmaps:
            self.names = dict(zip(self.paths, output_names(self.paths), strict=True))
        if self.args.regions:
            self.regions = open(self.regions_path, "a" if self.kept else "w", encoding="utf-8")

    def interrupted(self) -> str:
        if self.output is None:
            return f"; {self.written} rows were printed"
        left = len(self.paths) - len(self.done) - self.written
        return (
            f"; {len(self.done) + self.written} of {len(self.paths)} images are in "
            f"{self.csv_path} ({self.written} scored by this run, {left} left); finish "
            "with the same command and --resume"
        )

    def score(self, progress: bool, check: Callable[[], None]) -> list[tuple[str, str]]:
        """Score the images not done yet, writing each image's results; the failures.
        ``check()`` is called between two images (it raises to stop the run)."""
        todo = [path for path in self.paths if path not in self.done]
        if self.done:
            self.info(f"Resuming: {len(self.done)} images already in {self.csv_path}.")
        failures: list[tuple[str, str]] = []
        size = max(1, min(_SCORE_CHUNK, getattr(self.pipeline[0], "batch_size", 32) or 32))
        bar = tqdm(total=len(todo), desc="scoring", unit="img", disable=not progress, leave=False)
        try:
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                for path, image_map, score in _scored(self.pipeline, chunk, failures):
                    check()
                    self.write(path, image_map, score)
                check()
                bar.update(len(chunk))
        finally:
            bar.close()
            if self.regions is not None:
                self.regions.close()
            if self.csv is not None and self.output is not None:
                self.csv.close()
        return failures

    def write(self, path: str, image_map, score: float) -> None:
        """The image's picture (renamed into place), then its regions and row together."""
        regions = None
        if self.args.regions:
            (regions,) = defect_regions(
                image_map, self.thresholds.pixel, min_area=self.args.min_area
            )
        if self.args.heatmaps:
            self.save_picture(path, image_map, regions)
        image = self.thresholds.image
        row = [path, f"{score:.6g}", self.p_value(score)]
        if image is None:
            row += ["", "", ""]
        else:
            row += [
                f"{float(relative_score(score, image)):.4f}",
                f"{float(normalized_score(score, image)):.4f}",
                "anomalous" if score >= image else "normal",
            ]
        if regions is not None:
            row.append(str(len(regions)))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow(row)
        records = "".join(
            json.dumps({"image": path, **region.record()}) + "\n" for region in regions or ()
        )
        # An image's regions and row go together: check() is not called between them.
        if self.regions is not None:
            self.regions.write(records)
            self.regions.flush()
        csv_file = self.open_csv()
        csv_file.write(text.getvalue())
        csv_file.flush()
        self.written += 1
        self.scores.append(score)

    def p_value(self, score: float) -> str:
        """The image's conformal p-value, as written (empty without training scores)."""
        training = self.thresholds.training_scores
        if training is None:
            return ""
        return f"{float(p_values_from_scores(training, [score])[0]):.4g}"

    def open_csv(self):
        if self.csv is None:
            if self.output is None:
                self.csv = sys.stdout
                self.csv.write(",".join(self.header) + "\n")
            else:
                appending = bool(self.kept)
                self.csv = open(
                    self.csv_path, "a" if appending else "w", newline="", encoding="utf-8"
                )
                if not appending:
                    self.csv.write(",".join(self.header) + "\n")
        return self.csv

    def summarize(self) -> None:
        """``summary.json`` from every row of ``scores.csv`` (this run's scores without
        ``-o``); a line when the drift test finds drift."""
        scores = self.scores if self.output is None else _csv_scores(self.csv_path)
        threshold, training = self.thresholds.image, self.thresholds.training_scores
        summary = {"n_images": len(scores), "n_flagged": None, "threshold": threshold}
        summary.update(false_alarm_rate=None, drift_p_value=None, drift=None)
        if threshold is not None:
            summary["n_flagged"] = sum(score >= threshold for score in scores)
        if threshold is not None and training is not None and scores:
            summary.update(drift_report(training, scores, threshold))
        summary["threshold_source"] = self.thresholds.image_source
        if self.output is not None:
            with atomic_file(self.output / _SUMMARY) as file:
                file.write((json.dumps(summary, indent=1) + "\n").encode())
        if summary["drift"]:
            where = "" if self.output is None else f"; see {self.output / _SUMMARY}"
            self.warn(
                f"drift: {summary['n_flagged']} of {summary['n_images']} images are flagged, "
                f"and good images give at most {summary['false_alarm_rate']:.3g} of them "
                f"(drift p-value {summary['drift_p_value']:.2g} < {summary['level']:g}){where}",
            )

    def save_picture(self, path: str, image_map, regions) -> None:
        """The image's heat map; the colour scale is the first image's (median to maximum)."""
        self.scale = self.scale or (float(np.median(image_map)), float(image_map.max()))
        save_heatmaps(
            [path],
            image_map[None],
            self.output / "heatmaps",
            threshold=self.thresholds.image,
            threshold_source=self.thresholds.image_source,
            pixel_threshold=self.thresholds.pixel,
            regions=None if regions is None else [regions],
            names=[self.names[path]],
            vmin=self.scale[0],
            vmax=self.scale[1],
        )

    def finish(self, failures: list[tuple[str, str]]) -> None:
        total = len(self.done) + self.written
        if failures and not total:
            raise ValueError(failures[0][1])  # nothing could be scored: the first reason
        if self.output is not None:
            outputs = [str(self.csv_path)]
            if self.args.regions:
                outputs.append(str(self.regions_path))
            if self.args.heatmaps:
                outputs.append(f"pictures in {self.output / 'heatmaps'}")
            outputs.append(str(self.output / _SUMMARY))
            resumed = f" ({len(self.done)} from before)" if self.done else ""
            self.summarize()
            self.info(f"Scored {total} images{resumed}; wrote {', '.join(outputs)}.")
        else:
            self.summarize()
        if failures:
            for path, reason in failures:
                self.warn(f"not scored: {reason if path in reason else f'{path}: {reason}'}")
            raise ValueError(
                f"{len(failures)} of {len(self.paths)} images could not be scored (see the "
                "warnings above); the others were."
            )


def _scored(pipeline, chunk: list[str], failures: list):
    """``(path, map, score)`` of each image of a chunk that can be scored.

    The chunk is scored as one batch (:func:`~sk_padim.streaming.iter_scores`), which
    raises before yielding anything when an image cannot be read; it is then scored
    again image by image, so that the others are scored and each bad file is recorded
    in ``failures`` with the reason.
    """
    try:
        for index, image_map, score in iter_scores(pipeline, chunk, batch_size=len(chunk)):
            yield chunk[index], image_map, score
        return
    except (OSError, ValueError) as error:
        if len(chunk) == 1:
            failures.append((chunk[0], one_line(error)))
            return
    for path in chunk:
        try:
            ((_, image_map, score),) = iter_scores(pipeline, [path])
        except (OSError, ValueError) as error:
            failures.append((path, one_line(error)))
        else:
            yield path, image_map, score


def _completed_images(csv_path: Path, header: list[str]) -> set[str]:
    """The images already in an interrupted run's CSV (a cut last line is dropped)."""
    if not csv_path.is_file():
        return set()
    _drop_partial_line(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    if not rows:
        return set()
    if rows[0] != header:
        raise ValueError(
            f"{csv_path} has the columns {','.join(rows[0])}, not {','.join(header)}: it was "
            "written with other options. Resume with the options it was written with, or "
            "leave out --resume to start again."
        )
    bad = [i + 2 for i, row in enumerate(rows[1:]) if len(row) != len(header)]
    if bad:
        raise ValueError(f"{csv_path} line {bad[0]} is not a complete row; fix or remove it.")
    return {row[0] for row in rows[1:]}


def _csv_scores(csv_path: Path) -> list[float]:
    """The scores of every row of a ``scores.csv``."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="", encoding="utf-8") as file:
        return [float(row["score"]) for row in csv.DictReader(file)]


def _drop_partial_line(path: Path) -> None:
    """Cut a file after its last newline (a line cut by a crash)."""
    with open(path, "rb+") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            file.truncate(data.rfind(b"\n") + 1)


def _keep_regions_of(path: Path, images: set[str]) -> None:
    """Keep only the region records of ``images`` (those whose rows were written)."""
    if not path.is_file():
        return
    _drop_partial_line(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["image"] in images]
    if len(kept) != len(lines):
        with atomic_file(path) as file:
            file.write("".join(kept).encode())
