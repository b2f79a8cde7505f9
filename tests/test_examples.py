"""Every script in examples/ runs, at the small size that SK_PADIM_EXAMPLES_SMALL selects.

The same scripts are the documentation site's gallery (sphinx-gallery runs them when the
site is built): each starts with a docstring that has a title and a text block.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sk_padim import make_defect_textures, write_mvtec_layout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, cwd):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "SK_PADIM_EXAMPLES_SMALL": "1", "MPLBACKEND": "Agg"},
        timeout=600,
    )


def metric(text, name):
    """The number printed after ``name``; a metric must lie in [0, 1]."""
    value = float(re.search(rf"{name}\s+([0-9.]+)", text).group(1))
    assert 0 <= value <= 1, (name, value)
    return value


def table_row(line):
    """The cells of a row of a Markdown table."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_every_example_is_tested():
    tested = {
        "quickstart.py",
        "mvtec_evaluation.py",
        "custom_backbone.py",
        "calibration.py",
        "grid_search_memory.py",
        "export_onnx.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda path: path.name)
def test_every_example_has_a_gallery_title_and_text(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert docstring is not None, "sphinx-gallery needs a module docstring"
    over, title, under, blank, text, *_ = docstring.strip("\n").splitlines()
    # A reStructuredText title, over- and underlined with "=", then a text block.
    assert set(over) == {"="} and over == under and len(over) >= len(title.strip()), title
    assert not blank.strip() and text.strip(), "a text block after the title"


def test_quickstart(tmp_path):
    process = run_example("quickstart.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "maps (30, 64, 64), scores (30,)" in process.stdout
    # A pretrained backbone finds the built-in defects far better than chance.
    assert metric(process.stdout, "image AUROC") > 0.8
    assert metric(process.stdout, "pixel AUROC") > 0.8
    metric(process.stdout, "AUPRO")
    assert len(list((tmp_path / "quickstart-heatmaps").glob("*.png"))) == 3


def test_mvtec_evaluation_without_a_path_uses_the_built_in_textures(tmp_path):
    process = run_example("mvtec_evaluation.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    rows = [table_row(line) for line in process.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["brick", "grass", "gravel", "mean"]


def test_mvtec_evaluation_reads_the_given_root_and_category(tmp_path):
    dataset = make_defect_textures(
        ("brick", "grass"),
        image_size=48,
        n_train=5,
        n_test_good=2,
        n_test_defective=3,
        random_state=0,
    )
    root = write_mvtec_layout(dataset, tmp_path / "data")
    process = run_example("mvtec_evaluation.py", root, "grass", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    (row,) = [table_row(line) for line in process.stdout.splitlines()[2:]]
    assert row[:3] == ["grass", "5", "5"]  # 5 training and 2 + 3 test images
    assert all(0 <= float(value) <= 1 for value in row[3:6])  # image/pixel AUROC, AUPRO


def test_custom_backbone(tmp_path):
    process = run_example("custom_backbone.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    out = process.stdout
    assert "'block1', 'block1.0'" in out
    # The state-dict file holds the module's weights, so the results are identical.
    assert metric(out, r"SmallCNN \(random weights\): image AUROC") == metric(
        out, r"SmallCNN \(weights from file\): image AUROC"
    )


def test_calibration(tmp_path):
    process = run_example("calibration.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    image_line, pixel_line = process.stdout.splitlines()
    assert image_line.startswith("image threshold") and pixel_line.startswith("pixel threshold")
    for line in (image_line, pixel_line):
        assert metric(line, "validation F1") > 0 and metric(line, "test F1") > 0


def test_grid_search_memory(tmp_path):
    process = run_example("grid_search_memory.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr  # it asserts equal results itself
    assert re.search(r"without memory [0-9.]+ s, with memory [0-9.]+ s", process.stdout)
    assert metric(process.stdout, "pixel AUROC") > 0.8


def test_export_onnx(tmp_path):
    process = run_example("export_onnx.py", cwd=tmp_path)
    assert process.returncode == 0, process.stderr  # it checks the scores itself
    assert re.search(r"threshold [0-9.e+-]+: \d+ of 30 flagged", process.stdout)
    difference = float(re.search(r"score difference ([0-9.e+-]+)", process.stdout).group(1))
    assert difference < 1e-4
    assert (tmp_path / "padim.onnx").stat().st_size > 0
