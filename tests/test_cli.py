"""The sk-padim command: end to end in subprocesses, errors and options in-process."""

import csv
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.pipeline import Pipeline

from sk_padim import (
    F1ThresholdCalibrator,
    f1_optimal_threshold,
    load_mvtec_ad,
    make_defect_textures,
    write_mvtec_layout,
)
from sk_padim.cli import main
from sk_padim.evaluation import padim_pipeline

SIZE = 48
MODEL_ARGS = ["--image-size", str(SIZE), "--n-features", "16", "--random-state", "0"]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sk_padim.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def read_csv(path_or_text):
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(text.splitlines()))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two small categories in the MVTec AD layout."""
    dataset = make_defect_textures(
        ("brick", "grass"),
        image_size=SIZE,
        n_train=6,
        n_test_good=2,
        n_test_defective=4,
        random_state=0,
    )
    return write_mvtec_layout(dataset, tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def fitted(tree, resnet18_weights, tmp_path_factory):
    """``sk-padim fit`` run once on the brick category; (model path, completed process)."""
    model = tmp_path_factory.mktemp("model") / "sub" / "model.joblib"
    args = ["fit", tree / "brick", "-o", model, "--weights", resnet18_weights, *MODEL_ARGS]
    return model, run_cli(*args, cwd=tree)


def test_fit_saves_a_pipeline_fitted_on_train_good(fitted, tree):
    model_path, process = fitted
    assert process.returncode == 0, process.stderr
    model = joblib.load(model_path)
    assert isinstance(model, Pipeline)
    assert model.named_steps["feat"].n_features_ == 16
    assert model.named_steps["feat"].verbose is False
    n_good = len(list((tree / "brick" / "train" / "good").glob("*.png")))
    assert model.named_steps["padim"].n_samples_seen_ == n_good == 6
    # Standard error is a pipe here: no progress bars, the summary and the threshold's rule.
    line, rule = process.stderr.splitlines()
    assert line.startswith(f"Fitted on 6 images from {tree / 'brick' / 'train' / 'good'} in ")
    assert line.endswith(f"; wrote {model_path}.")
    threshold = model.named_steps["padim"].threshold_
    assert rule == (
        f"Image threshold {threshold:.6g}: the highest held-out score of the 6 training "
        "images; flags at most 0.143 of good images (1/(n+1))."
    )


def test_fit_on_a_plain_folder_uses_every_image_in_it(tree, resnet18_weights, tmp_path):
    folder = tree / "grass" / "test" / "good"
    args = ["fit", folder, "-o", tmp_path / "m.joblib", "--weights", resnet18_weights, "-q"]
    assert main([*map(str, args), *MODEL_ARGS]) == 0
    n_images = len(list(folder.glob("*.png")))
    assert joblib.load(tmp_path / "m.joblib").named_steps["padim"].n_samples_seen_ == n_images


def test_score_writes_one_row_per_image_with_the_models_scores(fitted, tree, tmp_path):
    model_path, _ = fitted
    test = tree / "brick" / "test"
    single = test / "hole" / "000.png"
    out = tmp_path / "out"
    args = ["score", model_path, test / "good", single, "-o", out, "--threshold", 5, "--verbose"]
    process = run_cli(*args, "--heatmaps", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "scoring" in process.stderr  # --verbose shows the progress bar on a pipe

    expected_paths = [*sorted(map(str, (test / "good").glob("*.png"))), str(single)]
    rows = read_csv(out / "scores.csv")
    assert [row["image"] for row in rows] == expected_paths
    expected = joblib.load(model_path).decision_function(expected_paths)
    scores = np.array([float(row["score"]) for row in rows])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert [row["label"] for row in rows] == ["anomalous" if s >= 5 else "normal" for s in scores]
    pictures = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert pictures == ["good_000.png", "good_001.png", "hole_000.png"]


def test_score_without_output_prints_the_csv_labelled_with_the_models_threshold(
    fitted, tree, capsys
):
    model_path, _ = fitted
    folder = tree / "brick" / "test" / "scratch"
    assert main(["score", str(model_path), str(folder)]) == 0
    out, err = capsys.readouterr()
    rows = read_csv(out)
    paths = sorted(map(str, folder.glob("*.png")))
    assert [row["image"] for row in rows] == paths
    model = joblib.load(model_path)
    threshold = model[-1].threshold_
    expected = model.decision_function(paths)
    assert [row["label"] for row in rows] == [
        "anomalous" if score >= threshold else "normal" for score in expected
    ]
    assert err == ""


def test_score_searches_the_sub_folders_of_an_mvtec_test_folder(fitted, tree):
    model_path, _ = fitted
    # Run from the dataset's root with a relative path: the CSV keeps paths relative.
    process = run_cli("score", model_path, Path("brick") / "test", "-q", cwd=tree)
    assert process.returncode == 0, process.stderr
    rows = read_csv(process.stdout)
    expected = sorted(
        path.relative_to(tree).as_posix() for path in (tree / "brick" / "test").rglob("*.png")
    )
    assert [row["image"] for row in rows] == expected
    assert {Path(row["image"]).parent.name for row in rows} == {
        "good",
        "hole",
        "patch",
        "scratch",
        "stain",
    }
    for row in rows:  # 6 significant digits
        assert row["score"] == f"{float(row['score']):.6g}"


def test_no_csv_is_started_when_nothing_could_be_scored(fitted, tmp_path, capsys):
    model_path, _ = fitted
    broken = tmp_path / "images" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    assert main(["score", str(model_path), str(broken.parent)]) == 1
    assert capsys.readouterr().out == ""  # no header without a row
    assert main(["score", str(model_path), str(broken), "-o", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_score_labels_with_a_calibrated_models_threshold(fitted, tree, tmp_path, capsys):
    model_path, _ = fitted
    test = load_mvtec_ad(tree, "brick", split="test")
    calibrator = F1ThresholdCalibrator(joblib.load(model_path)).fit(test.images, test.target)
    joblib.dump(calibrator, tmp_path / "calibrated.joblib")
    assert main(["score", str(tmp_path / "calibrated.joblib"), *test.images]) == 0
    labels = [row["label"] for row in read_csv(capsys.readouterr().out)]
    expected = calibrator.predict(test.images)
    assert labels == ["anomalous" if p == -1 else "normal" for p in expected]


def test_evaluate_prints_and_writes_a_row_per_category(tree, resnet18_weights, tmp_path):
    out = tmp_path / "results"
    args = ["evaluate", tree, "-o", out, "--weights", resnet18_weights, *MODEL_ARGS]
    process = run_cli(*args, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    rows = read_csv(out / "results.csv")
    assert [row["category"] for row in rows] == ["brick", "grass"]
    assert process.stdout.splitlines()[2].startswith("| brick ")
    assert (out / "results.md").read_text().strip() == process.stdout.strip()

    # The same model fitted here, scored with scikit-learn's AUC.
    for row in rows:
        train, _ = load_mvtec_ad(tree, row["category"], return_X_y=True)
        test = load_mvtec_ad(tree, row["category"], split="test")
        pipe = padim_pipeline(
            weights=resnet18_weights, image_size=SIZE, n_features=16, random_state=0
        ).fit(train)
        maps = pipe.score_samples(test.images)
        assert int(row["n_train"]) == len(train) and int(row["n_test"]) == len(test.images)
        assert float(row["image_auroc"]) == pytest.approx(
            roc_auc_score(test.target, pipe.decision_function(test.images)), abs=1e-6
        )
        assert float(row["pixel_auroc"]) == pytest.approx(
            roc_auc_score(test.masks.ravel(), maps.ravel()), abs=1e-6
        )
        assert 0 <= float(row["aupro"]) <= 1 and float(row["fit_seconds"]) > 0


def test_evaluate_skips_a_found_category_it_cannot_evaluate(tree, tmp_path):
    """A sibling whose masks are named otherwise is skipped with a warning naming the fix;
    named explicitly with the right --mask-suffix, it is evaluated."""
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    for mask in (root / "grass" / "ground_truth").rglob("*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    out = tmp_path / "results"
    args = ["evaluate", root, "-o", out, "--weights", "none", *MODEL_ARGS]
    process = run_cli(*args, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert [row["category"] for row in read_csv(out / "results.csv")] == ["brick"]
    (warning,) = [line for line in process.stderr.splitlines() if "warning" in line]
    assert warning.startswith("sk-padim evaluate: warning: skipping category grass: ")
    assert "--mask-suffix <their suffix>" in warning

    args = [*args, "--categories", "grass", "--mask-suffix", ".png"]
    assert main(list(map(str, args))) == 0
    assert [row["category"] for row in read_csv(out / "results.csv")] == ["grass"]


def test_evaluate_and_fit_take_a_category_folder_and_a_root(tree, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["--weights", "none", "-q", *MODEL_ARGS]
    assert main(["evaluate", str(tree / "grass"), "-o", str(out), *args]) == 0
    assert [row["category"] for row in read_csv(out / "results.csv")] == ["grass"]
    capsys.readouterr()
    # fit takes a category; given the root, it names the categories to choose from.
    assert main(["fit", str(tree), "-o", str(tmp_path / "m.joblib"), *args]) == 1
    err = capsys.readouterr().err
    assert "holds the categories brick, grass; fit one at a time" in err


def test_calibrate_picks_the_f1_optimal_image_threshold(fitted, tree, tmp_path, capsys):
    model_path, _ = fitted
    test = tree / "brick" / "test"
    bad = [test / kind for kind in ("hole", "patch", "scratch", "stain")]
    output = tmp_path / "calibrated.joblib"
    argv = ["calibrate", model_path, "--good", test / "good", "--bad", *bad, "-o", output]
    assert main(list(map(str, argv))) == 0
    out = capsys.readouterr().out

    # The same threshold from scikit-learn's precision-recall curve on the same images.
    good = sorted(map(str, (test / "good").glob("*.png")))
    defective = [str(p) for folder in bad for p in sorted(folder.glob("*.png"))]
    labels = np.repeat([0, 1], [len(good), len(defective)])
    scores = joblib.load(model_path).decision_function(good + defective)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = np.argmax(f1[:-1])
    calibrator = joblib.load(output)
    assert calibrator.level == "image"
    assert calibrator.threshold_ == pytest.approx(thresholds[best])
    assert calibrator.threshold_ == f1_optimal_threshold(labels, scores)
    assert out.splitlines()[0].startswith(f"threshold {thresholds[best]:.6g} (image level")
    assert f"F1 {f1[best]:.3f}, precision {precision[best]:.3f}, recall {recall[best]:.3f}" in out

    # score then labels with that threshold by default.
    assert main(["score", str(output), *good, *defective]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert [row["label"] for row in rows] == [
        "anomalous" if s >= thresholds[best] else "normal" for s in scores
    ]


def test_calibrate_with_masks_picks_the_f1_optimal_pixel_threshold(fitted, tree, tmp_path):
    model_path, _ = fitted
    test = load_mvtec_ad(tree, "brick", split="test")
    good = [
        path for path, kind in zip(test.images, test.defect_types, strict=True) if kind == "good"
    ]
    output = tmp_path / "calibrated.joblib"
    argv = [
        "calibrate",
        model_path,
        "--good",
        *good,
        "--bad",
        *[tree / "brick" / "test" / kind for kind in ("hole", "patch", "scratch", "stain")],
        "--masks",
        tree / "brick" / "ground_truth",
        "-o",
        output,
        "-q",
    ]
    assert main(list(map(str, argv))) == 0
    maps = joblib.load(model_path).score_samples(test.images)
    calibrator = joblib.load(output)
    assert calibrator.level == "pixel"
    assert calibrator.threshold_ == f1_optimal_threshold(test.masks, maps)


def test_cli_errors_name_options_not_python_parameters(tree, tmp_path, capsys):
    argv = ["fit", str(tree / "brick"), "-o", str(tmp_path / "m.joblib"), "--weights", "none"]
    assert main([*argv, "--image-size", "8"]) == 1
    err = capsys.readouterr().err
    assert "--image-size 8 leaves layer" in err and "image_size" not in err
    assert main([*argv, "--n-features", "1000", "--image-size", "32"]) == 1
    err = capsys.readouterr().err
    assert "--n-features 1000 but" in err and "use --n-features <= 448" in err


def test_demo_runs_at_small_size(tmp_path):
    args = ["demo", "--categories", "brick", "--image-size", 32, "--n-train", 8]
    process = run_cli(*args, "--n-heatmaps", 1, "-o", tmp_path / "demo", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    table = [line for line in process.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3 and table[2].startswith("| brick ")
    rows = read_csv(tmp_path / "demo" / "results.csv")
    assert len(rows) == 1 and rows[0]["n_train"] == "8"
    folder = tmp_path / "demo" / "heatmaps" / "brick"
    assert (folder / "regions.jsonl").is_file()  # the regions of every test image
    pictures = sorted(p.name for p in folder.glob("*.png"))
    kinds = ["good", "hole", "patch", "scratch", "stain"]  # one picture per defect type
    assert pictures == [f"{kind}_000.png" for kind in kinds]


def bad_model_file(kind, folder):
    path = folder / f"{kind}.joblib"
    if kind == "garbage":
        path.write_bytes(b"this is not a model")
    elif kind == "renamed_class":  # a pickle naming a class this version does not have
        path.write_bytes(b"csk_padim.detector\nPadimDetectorV0\n.")
    else:
        joblib.dump({"not": "a model"}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "Cannot load the model file"),
        ("renamed_class", "saved with other versions"),
        ("dict", "holds a dict, not an image model"),
    ],
)
def test_bad_model_file_is_a_one_line_error(kind, message, tree, tmp_path, capsys):
    path = bad_model_file(kind, tmp_path)
    assert main(["score", str(path), str(tree / "brick" / "test" / "good")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sk-padim score: error: ")
    assert message in err


def test_input_errors_are_one_line_naming_the_path(fitted, tree, tmp_path, capsys):
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"not a png")
    model_path, _ = fitted
    cases = [
        (["fit", str(tmp_path / "nowhere"), "-o", "m.joblib"], "nowhere"),
        (["score", str(tmp_path / "missing.joblib"), str(unreadable)], "missing.joblib"),
        (["score", str(model_path), str(tmp_path / "no_image.png")], "no_image.png"),
        (["score", str(model_path), str(unreadable)], "broken.png"),
        (["evaluate", str(tree), "--categories", "carpet"], "carpet"),
        (["evaluate", str(tree / "brick" / "test")], "<category>/train/good"),
        (["demo", "--categories", "marble", "--n-heatmaps", "0"], "marble"),
    ]
    for argv, name in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"sk-padim {argv[0]}: error: "), err
        assert name in err


def test_error_in_a_subprocess_has_no_traceback(tmp_path):
    process = run_cli("fit", tmp_path / "nowhere", "-o", "m.joblib", cwd=tmp_path)
    assert process.returncode == 1
    assert (
        process.stderr == f"sk-padim fit: error: Folder not found: {tmp_path / 'nowhere'}. "
        "Pass a folder of normal images, or an MVTec AD category folder.\n"
    )


def test_verbose_errors_add_the_traceback(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nowhere"), "-o", "m.joblib", "--verbose"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("sk-padim fit: error:")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["fit", "folder"],  # no -o
        ["score", "model.joblib", "images", "--heatmaps"],  # no -o for the pictures
        ["demo", "--image-size", "0"],
        ["fit", "folder", "-o", "m.joblib", "--verbose", "--quiet"],
    ],
)
def test_usage_errors_exit_with_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: sk-padim" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["fit"], ["score"], ["calibrate"], ["evaluate"], ["demo"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sk-padim {' '.join(command)}".strip())


def test_console_script_is_declared():
    (script,) = entry_points(group="console_scripts", name="sk-padim")
    assert script.value == "sk_padim.cli:main"


def test_weights_none_and_layers_reach_the_transformer(tree, tmp_path):
    model = tmp_path / "m.joblib"
    argv = [
        "fit",
        str(tree / "brick"),
        "-o",
        str(model),
        "--weights",
        "none",
        "-q",
        "--layers",
        "layer1,layer2",
        "--image-size",
        "32",
    ]
    assert main(argv) == 0
    feat = joblib.load(model).named_steps["feat"]
    assert feat.weights is None and feat.layers_ == ("layer1", "layer2")
    assert feat.layer_channels_ == (64, 128) and feat.n_features_ == 100


def test_unreadable_training_image_is_reported(tmp_path, capsys):
    folder = tmp_path / "good"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"garbage")
    assert main(["fit", str(folder), "-o", str(tmp_path / "m.joblib"), "--weights", "none"]) == 1
    assert "bad.png" in capsys.readouterr().err


def test_model_from_another_version_scores_with_a_one_line_warning(
    fitted, tree, tmp_path, monkeypatch, capsys
):
    model_path, _ = fitted
    old_versions = {"sk_padim": "0.0.1", "torch": "1.0.0"}
    model = joblib.load(model_path)
    with monkeypatch.context() as patch:  # pickle as if saved by old versions
        patch.setattr("sk_padim.versioning.current_versions", lambda: old_versions)
        joblib.dump(model, tmp_path / "old.joblib")
    folder = tree / "brick" / "test" / "good"
    assert main(["score", str(tmp_path / "old.joblib"), str(folder)]) == 0
    out, err = capsys.readouterr()
    assert len(read_csv(out)) == len(list(folder.glob("*.png")))
    warnings = err.splitlines()
    assert warnings and all(line.startswith("sk-padim: warning: ") for line in warnings)
    assert any("saved with sk_padim 0.0.1" in line for line in warnings)


def test_a_model_file_appears_whole_or_not_at_all(tmp_path):
    from sk_padim.cli import _dump

    with pytest.raises(Exception, match="pickle"):
        _dump(lambda: None, tmp_path / "model.joblib")  # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_a_native_non_square_model_round_trips_through_the_cli(tmp_path, resnet18_weights):
    # --image-size native keeps the images' own 40 x 64 size: the model, its maps and the
    # scores the command writes are those of the pipeline at that size.
    photo = make_defect_textures("gravel", image_size=64, n_train=6, random_state=0).gravel
    images = photo.X_train[:, :40]  # 40 x 64, non-square
    train = tmp_path / "gravel" / "train" / "good"
    test = tmp_path / "test"
    for folder, part in ((train, images[:4]), (test, images[4:])):
        folder.mkdir(parents=True)
        for number, image in enumerate(part):
            Image.fromarray(image).save(folder / f"{number:03d}.png")
    model_path = tmp_path / "model.joblib"
    args = ["--weights", resnet18_weights, "--n-features", "8", "--image-size", "native"]
    assert main(["fit", str(tmp_path / "gravel"), "-o", str(model_path), *args]) == 0
    model = joblib.load(model_path)
    assert model.named_steps["feat"].image_size_ == (40, 64)
    assert model.score_samples(images[4:]).shape == (2, 40, 64)
    assert main(["score", str(model_path), str(test), "-o", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out" / "scores.csv")
    expected = model.decision_function(images[4:])
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected, rtol=1e-5)
