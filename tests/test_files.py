from sk_padim.files import output_names


def test_output_names_are_paths_below_the_common_folder(tmp_path):
    paths = [tmp_path / "test" / "good" / "000.png", tmp_path / "test" / "hole" / "000.png"]
    assert output_names(paths) == ["good_000", "hole_000"]
    assert output_names([tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b.png"]) == [
        "a",
        "a-2",
        "b",
    ]
    assert output_names([tmp_path / "a.png"]) == ["a"]
    assert output_names([]) == []


def test_output_names_stay_unique_when_an_image_is_named_like_a_repeat(tmp_path):
    paths = [tmp_path / name for name in ("a.png", "a.jpg", "a-2.png", "a.tif")]
    assert output_names(paths) == ["a", "a-2", "a-2-2", "a-3"]
