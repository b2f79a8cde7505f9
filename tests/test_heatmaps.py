import json
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from sk_padim.evaluation import Category
from sk_padim.heatmaps import heatmap_writer, save_heatmaps
from sk_padim.plotting import AnomalyMapDisplay

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.mark.parametrize(("threshold", "width"), [(None, 600), (2.0, 900)])
def test_save_heatmaps_writes_pngs_of_the_documented_size(tmp_path, picture, threshold, width):
    image, anomaly_map, mask = picture
    images = np.stack([image, image])
    maps = np.stack([anomaly_map, np.zeros_like(anomaly_map)])
    paths = save_heatmaps(
        images, maps, tmp_path / "out", masks=[mask, mask], threshold=threshold, names=["a", "b"]
    )
    assert paths == [tmp_path / "out" / "a.png", tmp_path / "out" / "b.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG"
            assert png.size == (width, 360)  # 3 inches per panel by 3.6 inches, at 100 dpi


def test_save_heatmaps_size_follows_dpi(tmp_path, picture):
    image, anomaly_map, _ = picture
    (path,) = save_heatmaps(image[None], anomaly_map[None], tmp_path, dpi=50)
    assert path.name == "000.png"
    with Image.open(path) as png:
        assert png.size == (300, 180)


def test_save_heatmaps_uses_one_colour_scale_for_all_images(tmp_path, monkeypatch, picture):
    image, anomaly_map, _ = picture
    scales = []
    original = AnomalyMapDisplay.plot

    def record(self, *args, **kwargs):
        scales.append((self.vmin, self.vmax))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AnomalyMapDisplay, "plot", record)
    maps = np.stack([anomaly_map, anomaly_map / 2])
    save_heatmaps(np.stack([image, image]), maps, tmp_path)
    assert scales == [(np.median(maps), maps.max())] * 2


def test_save_heatmaps_rejects_mismatched_lengths(tmp_path, picture):
    image, anomaly_map, _ = picture
    with pytest.raises(ValueError, match="Got 1 images, 2 maps"):
        save_heatmaps(image[None], np.stack([anomaly_map] * 2), tmp_path)


def test_save_heatmaps_leaves_no_figure_to_close(tmp_path, picture):
    image, anomaly_map, _ = picture
    open_figures = plt.get_fignums()
    save_heatmaps(np.stack([image] * 3), np.stack([anomaly_map] * 3), tmp_path, threshold=2.0)
    assert plt.get_fignums() == open_figures


def test_without_matplotlib_save_heatmaps_fails_before_writing(tmp_path, monkeypatch, picture):
    image, anomaly_map, _ = picture
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"^save_heatmaps needs matplotlib"):
        save_heatmaps(image[None], anomaly_map[None], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_heatmap_writer_writes_the_regions_of_every_test_image(tmp_path):
    maps = np.zeros((4, 16, 16))
    masks = np.zeros((4, 16, 16), dtype=bool)
    maps[2, 2:5, 3:7] = masks[2, 2:5, 3:7] = 1  # one 3 x 4 defect
    maps[3, 10:12, 10:12] = masks[3, 10:12, 10:12] = 1  # one 2 x 2 defect
    kinds = np.array(["good", "good", "hole", "hole"])
    category = Category("tile", maps, maps, kinds != "good", masks, kinds)
    paths = heatmap_writer(tmp_path, 1)(category, maps, masks)
    assert [path.name for path in paths] == ["good_000.png", "hole_000.png"]
    lines = (tmp_path / "tile" / "regions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    got = [(r["image"], r["index"], r["region"], r["area"]) for r in records]
    assert got == [("hole_000", 2, 1, 12), ("hole_001", 3, 1, 4)]
    box = [records[0][k] for k in ("row_min", "col_min", "row_max", "col_max")]
    assert box == [2, 3, 5, 7]
