"""The command line's decisions from good images (issue 30): ``fit --false-alarm-rate``,
suspects named by file and ``--exclude-suspects``, ``info``, the ``p_value`` column,
run-time thresholds and ``summary.json``'s drift test."""

import csv
import json
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image
from synthetic import gravel_with_defects

from sk_padim import make_defect_textures
from sk_padim.cli import main
from sk_padim.conformal import (
    SuspectTrainingImagesWarning,
    conformal_threshold,
    drift_report,
    p_values_from_scores,
)

LITE = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--random-state", "0"]


def write_images(images, folder: Path, prefix="img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def gravel(tmp_path_factory):
    """40 good gravel crops (128 px) to fit on, 40 unseen ones, the latter darkened; a
    model fitted by ``sk-padim fit --false-alarm-rate 0.1``."""
    root = tmp_path_factory.mktemp("decisions")
    data = make_defect_textures(
        "gravel", image_size=128, n_train=80, n_test_good=0, n_test_defective=1, random_state=0
    )
    images = data.gravel.X_train
    write_images(images[:40], root / "train")
    write_images(images[40:], root / "unseen")
    write_images((images[40:] * 0.5).astype(np.uint8), root / "dark")
    model = root / "model.joblib"
    argv = ["fit", str(root / "train"), "-o", str(model), "--false-alarm-rate", "0.1", *LITE]
    assert main([*argv, "-q"]) == 0
    return root, model


def test_fit_with_a_false_alarm_rate_saves_the_conformal_threshold(gravel):
    _, model = gravel
    detector = joblib.load(model)[-1]
    assert detector.false_alarm_rate == 0.1
    assert detector.threshold_ == conformal_threshold(detector.training_scores_, 0.1)
    assert detector.threshold_rule_["n_training_images"] == 40


def test_info_prints_the_rule_and_the_training_score_range(gravel, capsys):
    _, model = gravel
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    detector = joblib.load(model)[-1]
    scores = detector.training_scores_
    assert f"image threshold: {detector.threshold_:.6g} (the model's own)" in out
    assert "rule: false-alarm rate 0.1, a held-out score of the 40 training images" in out
    promise = detector.threshold_rule_["implied_false_alarm_rate"]
    assert f"flags at most {promise:.3g} of good images" in out
    assert f"min {scores.min():.6g}, median {np.median(scores):.6g}, max {scores.max():.6g}" in out
    assert "quantile 0.999 of the held-out training maps' pixels" in out


def test_score_writes_p_values_and_a_summary_without_drift_on_unseen_good_images(gravel, tmp_path):
    root, model = gravel
    out = tmp_path / "unseen"
    assert main(["score", str(model), str(root / "unseen"), "-o", str(out), "-q"]) == 0
    rows = read_rows(out / "scores.csv")
    detector = joblib.load(model)[-1]
    scores = np.array([float(row["score"]) for row in rows])
    expected = p_values_from_scores(detector.training_scores_, scores)
    np.testing.assert_allclose([float(row["p_value"]) for row in rows], expected, rtol=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    report = drift_report(detector.training_scores_, scores, detector.threshold_)
    assert summary["n_images"] == 40 and summary["n_flagged"] == report["n_flagged"]
    assert summary["n_flagged"] == sum(row["label"] == "anomalous" for row in rows)
    assert summary["false_alarm_rate"] == pytest.approx(report["false_alarm_rate"])
    assert summary["drift_p_value"] == pytest.approx(report["drift_p_value"])
    assert summary["drift"] is False


def test_darkened_images_are_reported_as_drift_and_resume_summarises_every_row(
    gravel, tmp_path, capsys
):
    root, model = gravel
    out = tmp_path / "dark"
    argv = ["score", str(model), str(root / "dark"), "-o", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "drift" in line]
    assert line.startswith("sk-padim score: warning: drift: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drift"] is True and summary["drift_p_value"] < 0.01

    # An interrupted run (its last rows missing, no summary) finished with --resume.
    csv_path = out / "scores.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:11]))
    (out / "summary.json").unlink()
    assert main([*argv, "--resume", "-q"]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_run_time_thresholds_override_the_models_for_one_run(gravel, tmp_path, capsys):
    root, model = gravel
    detector = joblib.load(model)[-1]
    for option, value, threshold in (
        ("--false-alarm-rate", "0.25", conformal_threshold(detector.training_scores_, 0.25)),
        ("--threshold", "1e9", 1e9),
    ):
        out = tmp_path / option.strip("-")
        argv = ["score", str(model), str(root / "unseen"), "-o", str(out), option, value]
        assert main([*argv, "-q"]) == 0
        rows = read_rows(out / "scores.csv")
        labels = ["anomalous" if float(r["score"]) >= threshold else "normal" for r in rows]
        assert [row["label"] for row in rows] == labels
        assert json.loads((out / "summary.json").read_text())["threshold"] == threshold
    assert joblib.load(model)[-1].threshold_ == detector.threshold_  # the model unchanged
    with pytest.raises(SystemExit):
        both = ["--threshold", "1", "--false-alarm-rate", "0.1"]
        main(["score", str(model), str(root / "unseen"), *both])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """36 good gravel crops (128 px) and 4 with a hole or a patch, in one folder."""
    root = tmp_path_factory.mktemp("contaminated")
    data = gravel_with_defects()
    write_images(data.gravel.X_train, root / "train", prefix="good")
    bad = write_images(data.gravel.X_test, root / "train", prefix="zbad")
    return root, bad


def test_fit_names_suspect_training_images_by_file_and_can_leave_them_out(
    contaminated, tmp_path, capsys
):
    root, bad = contaminated
    model = tmp_path / "model.joblib"
    assert main(["fit", str(root / "train"), "-o", str(model), *LITE]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "outliers" in line]
    fitted = joblib.load(model)[-1]
    named = [bad[i - 36] for i in fitted.suspect_indices_]  # the files sort good*, zbad*
    assert len(named) >= 3 and all(i >= 36 for i in fitted.suspect_indices_)
    assert line.startswith(
        f"sk-padim fit: warning: {len(named)} of 40 training images score as outliers"
    )
    assert all(path in line for path in named) and "--exclude-suspects" in line
    assert fitted.n_samples_seen_ == 40

    kept = tmp_path / "kept.joblib"
    assert main(["fit", str(root / "train"), "-o", str(kept), "--exclude-suspects", *LITE]) == 0
    err = capsys.readouterr().err
    assert "they were left out and the model refitted on the others" in err
    assert f"Fitted on {40 - len(named)} images" in err
    refitted = joblib.load(kept)
    assert refitted[-1].n_samples_seen_ == 40 - len(named)
    # The same model as a fit on the other files alone (the features were reused).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SuspectTrainingImagesWarning)
        others = sorted(str(p) for p in (root / "train").glob("*.png") if str(p) not in named)
        expected = joblib.load(model).fit(others)[-1]
    np.testing.assert_allclose(refitted[-1].training_scores_, expected.training_scores_, rtol=1e-4)
    assert refitted[-1].threshold_ == pytest.approx(expected.threshold_, rel=1e-4)
