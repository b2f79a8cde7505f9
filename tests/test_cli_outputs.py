"""``sk-padim score``'s outputs: row by row, interrupt-safe, resumable; regions; the
good-only calibration; a fast ``--help`` (issue 23)."""

import ast
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image

from sk_padim.calibration import QuantileThresholdCalibrator
from sk_padim.cli import _CSV_HEADER, main
from sk_padim.cli_parser import _FEATURE_DEFAULTS, DEMO_BACKBONE
from sk_padim.evaluation import padim_pipeline
from sk_padim.regions import defect_regions, normalized_score, relative_score
from tests.synthetic import smooth_texture

SIZE = 32
N_IMAGES = 32
ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A model fitted with 2 images per batch (so ``score`` writes rows 2 by 2), its
    file, and a folder of N_IMAGES test images, some with a bright square."""
    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(0)
    train = np.stack([smooth_texture(rng, SIZE) for _ in range(12)])
    pipe = padim_pipeline(
        weights=None, image_size=SIZE, n_features=8, batch_size=2, random_state=0
    ).fit(train)
    joblib.dump(pipe, root / "model.joblib")
    folder = root / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        image = smooth_texture(rng, SIZE)
        if i % 3 == 0:
            image[8:14, 10:18] = 255
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    good = root / "good"
    good.mkdir()
    for i in range(10):
        Image.fromarray(smooth_texture(rng, SIZE)).save(good / f"{i:03d}.png")
    return root, pipe, folder, good


def score_argv(root, folder, output, *extra):
    return ["score", str(root / "model.joblib"), str(folder), "-o", str(output), *extra]


def check_outputs(output: Path, n_expected: int | None = None) -> list[dict]:
    """Every file whole: CSV rows complete, pictures decodable, no temporary file left."""
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]
    text = (output / "scores.csv").read_text()
    assert text.endswith("\n")
    rows = read_rows(output / "scores.csv")
    for row in rows:
        assert list(row) == [*_CSV_HEADER, "regions"] and None not in row.values()
        assert float(row["score"]) > 0 and row["label"] in ("normal", "anomalous")
        assert 0 < float(row["normalized"]) < 1 and int(row["regions"]) >= 0
    if n_expected is not None:
        assert len(rows) == n_expected
    pictures = sorted((output / "heatmaps").glob("*.png"))
    assert len(pictures) >= len(rows)  # a row is written after its picture
    for picture in pictures:
        with Image.open(picture) as image:
            image.load()
    images = {row["image"] for row in rows}
    records = [json.loads(line) for line in (output / "regions.jsonl").read_text().splitlines()]
    assert {record["image"] for record in records} <= images
    return rows


def test_an_interrupted_score_keeps_whole_files_and_resume_finishes_it(data, tmp_path):
    root, pipe, folder, _ = data
    output = tmp_path / "interrupted"
    argv = score_argv(root, folder, output, "--heatmaps", "--regions")
    process = subprocess.Popen(
        [sys.executable, "-m", "sk_padim.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    csv_path = output / "scores.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if csv_path.exists() and csv_path.read_text().count("\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    (line,) = err.splitlines()  # one line, no traceback
    rows = check_outputs(output)
    assert 3 <= len(rows) < N_IMAGES
    assert line.startswith(f"sk-padim score: interrupted; {len(rows)} of {N_IMAGES} images are in")
    assert "--resume" in line

    assert main([*argv, "--resume", "-q"]) == 0
    resumed = check_outputs(output, N_IMAGES)
    assert resumed[: len(rows)] == rows  # the rows written before are kept as they were

    fresh = tmp_path / "fresh"  # uninterrupted (pictures left out: they take the time)
    assert main([*score_argv(root, folder, fresh, "--regions"), "-q"]) == 0
    expected = read_rows(fresh / "scores.csv")
    assert sorted(row["image"] for row in resumed) == [row["image"] for row in expected]
    by_image = {row["image"]: row for row in resumed}
    for row in expected:
        got = by_image[row["image"]]
        assert got["label"] == row["label"] and got["regions"] == row["regions"]
        assert float(got["score"]) == pytest.approx(float(row["score"]), rel=1e-5)
    pictures = sorted(p.name for p in (output / "heatmaps").iterdir())
    assert pictures == sorted(f"{i:03d}.png" for i in range(N_IMAGES))
    n_regions = len((output / "regions.jsonl").read_text().splitlines())
    assert n_regions == len((fresh / "regions.jsonl").read_text().splitlines())


def test_every_interrupt_stops_score_and_resume_finishes_after_many(data, tmp_path):
    """Ctrl-C at 10 points of the run (after 1 to 20 more rows, at random sub-row delays)
    exits with 130 each time, with whole files, and nothing swallowed (issue 30: one
    interrupt in four landed in a weak-reference callback and was lost); each run resumes
    the one before, and the last finishes: every image scored once, as a fresh run."""
    root, _, folder, _ = data
    many = tmp_path / "many"
    many.mkdir()
    for i in range(4):  # 128 images: long enough a run to interrupt 10 times
        for image in sorted(folder.iterdir()):
            (many / f"{i}-{image.name}").symlink_to(image)
    n_images = 4 * N_IMAGES
    output = tmp_path / "out"
    argv = score_argv(root, many, output, "--heatmaps", "--regions")
    rng = np.random.default_rng(0)
    for more_rows in (1, 2, 3, 5, 8, 10, 12, 15, 18, 20):
        before = len(read_rows(output / "scores.csv")) if output.exists() else 0
        process = subprocess.Popen(
            [sys.executable, "-m", "sk_padim.cli", *argv, *(["--resume"] if before else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        csv_path, deadline = output / "scores.csv", time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if csv_path.exists() and csv_path.read_text().count("\n") >= 1 + before + more_rows:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # between two rows, or while one is written
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        assert "Exception ignored" not in err and "Traceback" not in err
        *resuming, line = err.splitlines()  # "Resuming: ..." after the first run
        assert len(resuming) == (1 if before else 0)
        assert line.startswith("sk-padim score: interrupted; ")
        rows = check_outputs(output)
        assert len(rows) >= before + more_rows
        assert not (output / "summary.json").exists()  # written by a finished run only
    assert main([*argv, "--resume", "-q"]) == 0
    rows = check_outputs(output, n_images)
    assert sorted(row["image"] for row in rows) == sorted(str(p) for p in many.iterdir())
    assert json.loads((output / "summary.json").read_text())["n_images"] == n_images


def test_csv_and_regions_hold_the_readable_scores_and_the_library_regions(data, tmp_path):
    root, pipe, folder, _ = data
    output = tmp_path / "out"
    assert main([*score_argv(root, folder, output, "--regions", "--min-area", "3"), "-q"]) == 0
    rows = read_rows(output / "scores.csv")
    paths = [row["image"] for row in rows]
    maps = pipe.score_samples(paths)
    scores = maps.max(axis=(1, 2))
    threshold, pixel = pipe[-1].threshold_, pipe[-1].pixel_threshold_
    for row, score in zip(rows, scores, strict=True):
        assert float(row["relative"]) == pytest.approx(score / threshold, abs=1e-4)
        assert float(row["normalized"]) == pytest.approx(score / (score + threshold), abs=1e-4)
    expected = defect_regions(maps, pixel, min_area=3)
    assert [int(row["regions"]) for row in rows] == [len(found) for found in expected]
    records = [json.loads(line) for line in (output / "regions.jsonl").read_text().splitlines()]
    flat = [(paths[r.image], r) for found in expected for r in found]
    assert len(records) == len(flat) > 0
    for record, (path, region) in zip(records, flat, strict=True):
        assert record["image"] == path and record["region"] == region.label
        box = [record[k] for k in ("row_min", "col_min", "row_max", "col_max")]
        assert box == [region.row_min, region.col_min, region.row_max, region.col_max]
        assert record["area"] == region.area >= 3
        assert record["peak_relative"] == pytest.approx(
            float(relative_score(region.peak_score, pixel)), rel=1e-5
        )
        assert record["peak_normalized"] == pytest.approx(
            float(normalized_score(region.peak_score, pixel)), rel=1e-5
        )


def test_a_corrupt_image_is_named_and_the_others_are_scored(data, tmp_path, capsys):
    root, _, folder, _ = data
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000.png", "001.png", "002.png"):
        (images / name).write_bytes((folder / name).read_bytes())
    (images / "001b.png").write_bytes(b"not a png")
    assert main(score_argv(root, images, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "001b.png" in err and "1 of 4 images could not be scored" in err
    rows = read_rows(tmp_path / "out" / "scores.csv")
    assert [Path(row["image"]).name for row in rows] == ["000.png", "001.png", "002.png"]


def test_resume_refuses_a_csv_written_with_other_columns(data, tmp_path, capsys):
    root, _, folder, _ = data
    output = tmp_path / "out"
    output.mkdir()
    (output / "scores.csv").write_text("image,score\nx.png,1\n")
    assert main([*score_argv(root, folder, output), "--resume"]) == 1
    assert "written with other options" in capsys.readouterr().err


def test_a_model_without_threshold_keeps_the_label_column_and_says_why(data, tmp_path, capsys):
    root, _, folder, _ = data
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((folder / "001.png").read_bytes())
    model = tmp_path / "one.joblib"
    argv = ["fit", str(one), "-o", str(model), "--weights", "none", "--image-size", "32"]
    assert main([*argv, "--n-features", "8"]) == 0
    assert "warning" in capsys.readouterr().err  # fitting on one image warns, on one line
    assert main(["score", str(model), str(folder / "002.png")]) == 0
    out, err = capsys.readouterr()
    (row,) = list(csv.DictReader(out.splitlines()))
    assert list(row) == _CSV_HEADER and row["label"] == ""
    assert "has no threshold" in err and "--threshold" in err and "calibrate" in err


def test_calibrate_from_good_images_alone_sets_the_pixel_quantile(data, tmp_path, capsys):
    root, pipe, folder, good = data
    output = tmp_path / "calibrated.joblib"
    argv = ["calibrate", str(root / "model.joblib"), "--good", str(good), "-o", str(output)]
    assert main([*argv, "--quantile", "0.99"]) == 0
    out = capsys.readouterr().out
    calibrator = joblib.load(output)
    assert isinstance(calibrator, QuantileThresholdCalibrator)
    paths = sorted(map(str, good.glob("*.png")))
    expected = np.quantile(pipe.score_samples(paths), 0.99)
    assert calibrator.pixel_threshold_ == pytest.approx(expected)
    assert out.startswith(f"pixel threshold {expected:.6g} (the 0.99 quantile")
    assert "about 1 % of good pixels" in out
    # score then cuts the regions at it, and labels with the model's own threshold.
    scored = tmp_path / "scored"
    assert main(["score", str(output), str(folder), "-o", str(scored), "--regions", "-q"]) == 0
    records = [json.loads(line) for line in (scored / "regions.jsonl").read_text().splitlines()]
    assert records and {r["threshold"] for r in records} == {float(f"{expected:.6g}")}


def test_calibrate_refuses_the_same_images_as_both_classes(data, capsys):
    root, _, _, good = data
    argv = ["calibrate", str(root / "model.joblib"), "--good", str(good), "--bad", str(good)]
    assert main([*argv, "-o", "never.joblib"]) == 1
    assert "given both as --good and as --bad" in capsys.readouterr().err
    assert not Path("never.joblib").exists()


def test_help_needs_neither_torch_nor_scikit_learn():
    """The command's modules import the library inside the commands only."""
    heavy = {"torch", "torchvision", "sklearn", "joblib", "numpy", "tqdm", "scipy", "skimage"}
    light = {"sk_padim._checks", "sk_padim._version", "sk_padim.cli_parser"}
    for module in ("cli", "cli_parser"):
        top = []
        for node in ast.parse((ROOT / "sk_padim" / f"{module}.py").read_text()).body:
            if isinstance(node, ast.Import):
                top += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                top.append(node.module)
        assert {name for name in top if name.startswith("sk_padim")} <= light, module
        assert not {name.split(".")[0] for name in top} & heavy, module
    # Those two must stay light too (with sk_padim/__init__.py importing lazily).
    for module in ("_checks", "_version"):
        source = ast.parse((ROOT / "sk_padim" / f"{module}.py").read_text())
        names = {
            (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(source)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in getattr(n, "names", [])
        }
        assert not names & {"torch", "torchvision", "sklearn"}, (module, names)


def test_the_help_texts_defaults_are_the_librarys():
    from sk_padim.demo import DEMO_BACKBONE as LIBRARY_DEMO_BACKBONE
    from sk_padim.features import PatchFeatureTransformer

    params = PatchFeatureTransformer().get_params()
    assert _FEATURE_DEFAULTS == {name: params[name] for name in _FEATURE_DEFAULTS}
    assert DEMO_BACKBONE == LIBRARY_DEMO_BACKBONE


def test_fit_on_a_missing_folder_says_folder_not_found():
    from sk_padim.evaluation import padim_pipeline as pipeline

    with pytest.raises(FileNotFoundError, match="Folder not found: no/such/folder"):
        pipeline(weights=None).fit("no/such/folder")
    assert not os.path.exists("no/such/folder")
