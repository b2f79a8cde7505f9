"""The MVTec AD folder layout: find, read and write categories.

A module of the front: it lists image files with :func:`sk_padim.core.images.list_images`
(also importable from here) and reads categories as the evaluation harness's
:class:`~sk_padim.evaluation.Category`. The built-in synthetic datasets are
:mod:`sk_padim.synthetic`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch

from sk_padim.core.images import IMAGE_SUFFIXES, list_images
from sk_padim.evaluation import Category

__all__ = [
    "IMAGE_SUFFIXES",
    "find_mvtec_categories",
    "list_images",
    "load_masks",
    "load_mvtec_ad",
    "load_mvtec_category",
    "write_mvtec_layout",
]

_SPLITS = ("test", "train")
_GOOD = "good"
_MASK_SUFFIX = "_mask.png"

# --------------------------------------------------------------------------- loader


def find_mvtec_categories(folder: str | os.PathLike) -> tuple[Path, list[str]]:
    """The categories in the MVTec AD layout that a folder is, or holds.

    A category folder is one with a ``train/good`` sub-folder. ``folder`` may be a
    category itself, or a dataset root holding categories.

    Parameters
    ----------
    folder : str or path-like
        A category folder or a dataset root.

    Returns
    -------
    root : pathlib.Path
        The folder holding the categories: ``folder``'s parent if ``folder`` is a
        category, else ``folder``.
    names : list of str
        The category names, sorted; empty if ``folder`` neither is nor holds one.

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a folder.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.datasets import find_mvtec_categories, write_mvtec_layout
    >>> dataset = make_defect_textures(("brick", "grass"), n_train=2, random_state=0)
    >>> root = write_mvtec_layout(dataset, tempfile.mkdtemp())
    >>> find_mvtec_categories(root)[1]
    ['brick', 'grass']
    >>> find_mvtec_categories(root / "grass") == (root, ["grass"])
    True
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder not found: {folder}.")
    if _is_category(folder):
        return folder.parent, [folder.name]
    return folder, sorted(path.name for path in folder.iterdir() if _is_category(path))


def _is_category(folder: Path) -> bool:
    return (folder / "train" / _GOOD).is_dir()


def load_masks(
    images: list[str], folder: str | os.PathLike, *, mask_suffix: str = _MASK_SUFFIX
) -> np.ndarray | list[np.ndarray]:
    """Read the ground-truth masks of defective images from a folder that mirrors theirs.

    The mask of an image is found by its path below the folder common to all the
    images: image ``<common>/<sub>/<name>.<ext>`` has mask
    ``<folder>/<sub>/<name><mask_suffix>``. So the masks of ``test/hole/*.png`` and
    ``test/scratch/*.png`` are read from ``ground_truth/hole`` and
    ``ground_truth/scratch`` when ``folder`` is ``ground_truth``, and the masks of
    ``test/hole/*.png`` alone from ``folder="ground_truth/hole"``.

    Parameters
    ----------
    images : list of str
        Image file paths.
    folder : str or path-like
        The folder of the masks.
    mask_suffix : str, default="_mask.png"
        What follows the image's name (without its suffix) in its mask's file name.

    Returns
    -------
    masks : ndarray of shape (n_images, height, width), dtype bool
        The masks, nonzero pixels True; a list of ``(height_i, width_i)`` arrays when
        the images' sizes differ.

    Raises
    ------
    FileNotFoundError
        If a mask is missing; the message names it.
    ValueError
        If a mask's size differs from its image's.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.datasets import list_images, load_masks, write_mvtec_layout
    >>> dataset = make_defect_textures("brick", n_test_good=0, random_state=0)
    >>> root = write_mvtec_layout(dataset, tempfile.mkdtemp())
    >>> images = list_images(root / "brick" / "test", recursive=True)
    >>> masks = load_masks(images, root / "brick" / "ground_truth")
    >>> bool((masks == dataset.brick.masks_test).all())
    True
    """
    common = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in images]))
    masks = _empty_masks(images)
    for i, image in enumerate(images):
        relative = Path(os.path.abspath(image)).relative_to(common)
        mask_path = Path(folder) / relative.parent / (relative.stem + mask_suffix)
        masks[i] = _read_mask(mask_path, masks[i].shape, images[i], mask_suffix)
    return masks


def load_mvtec_ad(
    root: str | os.PathLike,
    category: str,
    split: str = "train",
    *,
    return_X_y: bool = False,
    mask_suffix: str = _MASK_SUFFIX,
) -> Bunch | tuple[list[str], np.ndarray]:
    """Load one category of a dataset in the MVTec AD folder layout.

    The layout is::

        <root>/<category>/train/good/<name>.png
        <root>/<category>/test/<defect_type>/<name>.png       (good is one defect type)
        <root>/<category>/ground_truth/<defect_type>/<name>_mask.png

    Any dataset laid out this way can be read (MVTec AD, BTAD, VisA after conversion,
    the output of :func:`write_mvtec_layout`). Images are returned as file paths; the
    estimators read them.

    Parameters
    ----------
    root : str or path-like
        Folder holding one sub-folder per category.
    category : str
        Name of the category folder, e.g. ``"bottle"``.
    split : {"train", "test"}, default="train"
        ``"train"`` reads ``train/good``; ``"test"`` reads every sub-folder of
        ``test``.
    return_X_y : bool, default=False
        If True, return ``(images, target)`` instead of a Bunch, and read no masks.
    mask_suffix : str, default="_mask.png"
        The mask of image ``<name>.<ext>`` is ``ground_truth/<defect_type>/<name>``
        followed by this suffix. BTAD, for example, needs ``".png"``.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes:

        images : list of str
            Image file paths, sorted by defect type, then by file name.
        target : ndarray of shape (n_images,), dtype int
            0 for good images, 1 for defective ones.
        masks : ndarray of shape (n_images, height, width), dtype bool
            Ground-truth defect masks at the images' size; any nonzero mask pixel is
            defective, and good images get an all-False mask. When the images do not
            all have the same size, a list of ``(height_i, width_i)`` arrays instead.
        defect_types : ndarray of shape (n_images,), dtype str
            Name of the folder each image came from (``"good"`` for normal images).

    (images, target) : tuple
        If ``return_X_y`` is True.

    Raises
    ------
    ValueError
        If ``split`` is not ``"train"`` or ``"test"``, or a mask's size differs from
        its image's.
    FileNotFoundError
        If a folder of the layout, an image in it, or a defective image's mask is
        missing; the message names the path.

    See Also
    --------
    make_defect_textures : The built-in dataset.
    write_mvtec_layout : Write the built-in dataset in this layout.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.datasets import load_mvtec_ad, write_mvtec_layout
    >>> dataset = make_defect_textures(categories="brick", random_state=0)
    >>> root = write_mvtec_layout(dataset, tempfile.mkdtemp())
    >>> test = load_mvtec_ad(root, "brick", split="test")
    >>> len(test.images), test.masks.shape
    (30, (30, 128, 128))
    >>> np.unique(test.defect_types).tolist()
    ['good', 'hole', 'patch', 'scratch', 'stain']
    >>> images, target = load_mvtec_ad(root, "brick", return_X_y=True)
    >>> len(images), int(target.sum())
    (40, 0)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}.")
    category_dir = _existing_dir(Path(root) / category, "Category folder")
    split_dir = _existing_dir(category_dir / split, "Split folder")
    if split == "train":
        type_dirs = [_existing_dir(split_dir / _GOOD, "Folder of good training images")]
    else:
        type_dirs = _subfolders(split_dir)

    images, defect_types = [], []
    for type_dir in type_dirs:
        paths = list_images(type_dir)
        images += paths
        defect_types += [type_dir.name] * len(paths)
    defect_types = np.asarray(defect_types)
    target = (defect_types != _GOOD).astype(int)
    if return_X_y:
        return images, target
    masks = _read_masks(images, defect_types, category_dir / "ground_truth", mask_suffix)
    return Bunch(images=images, target=target, masks=masks, defect_types=defect_types)


def load_mvtec_category(
    root: str | os.PathLike, name: str, *, mask_suffix: str = _MASK_SUFFIX
) -> Category:
    """Read one category in the MVTec AD layout for :func:`sk_padim.evaluation.evaluate`.

    Parameters
    ----------
    root : str or path-like
        The folder holding the category folder.
    name : str
        The category folder's name.
    mask_suffix : str, default="_mask.png"
        What follows an image's name in its mask's file name.

    Returns
    -------
    category : Category
        Its images as file paths (:func:`load_mvtec_ad`), its masks as arrays.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.datasets import load_mvtec_category, write_mvtec_layout
    >>> data = make_defect_textures("grass", n_train=3, random_state=0)
    >>> root = write_mvtec_layout(data, tempfile.mkdtemp())
    >>> grass = load_mvtec_category(root, "grass")
    >>> len(grass.X_train), grass.masks_test.shape
    (3, (30, 128, 128))
    """
    X_train, _ = load_mvtec_ad(root, name, return_X_y=True)
    test = load_mvtec_ad(root, name, split="test", mask_suffix=mask_suffix)
    return Category(name, X_train, test.images, test.target, test.masks, test.defect_types)


def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} not found: {path}. Expected the MVTec AD layout "
            "<root>/<category>/{train/good, test/<defect_type>, ground_truth/<defect_type>}."
        )
    return path


def _subfolders(folder: Path) -> list[Path]:
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise FileNotFoundError(
            f"No defect-type folders in {folder}. Put the test images in sub-folders "
            "named after their defect type, with normal images in 'good'."
        )
    return subfolders


def _read_masks(
    images: list[str], defect_types: np.ndarray, ground_truth: Path, mask_suffix: str
) -> np.ndarray | list[np.ndarray]:
    masks = _empty_masks(images)
    for i in np.flatnonzero(defect_types != _GOOD):
        mask_path = ground_truth / defect_types[i] / (Path(images[i]).stem + mask_suffix)
        masks[i] = _read_mask(mask_path, masks[i].shape, images[i], mask_suffix)
    return masks


def _empty_masks(images: list[str]) -> np.ndarray | list[np.ndarray]:
    """All-False masks at the images' sizes: one array, or a list if the sizes differ."""
    shapes = [_image_shape(path) for path in images]
    if len(set(shapes)) == 1:
        return np.zeros((len(images), *shapes[0]), dtype=bool)
    return [np.zeros(shape, dtype=bool) for shape in shapes]


def _image_shape(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def _read_mask(path: Path, shape: tuple[int, int], image: str, mask_suffix: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"Ground-truth mask not found: {path}, the mask of {image} (masks are named "
            f"<image name>{mask_suffix}). If your dataset's masks are named otherwise, pass "
            "mask_suffix='<their suffix>'."
        )
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != shape:
        raise ValueError(
            f"Mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is "
            f"{shape[1]}x{shape[0]}; masks must have their image's size."
        )
    return mask


# ------------------------------------------------------------------------ writer


def write_mvtec_layout(dataset: Mapping[str, Bunch], root: str | os.PathLike) -> Path:
    """Write a dataset made by :func:`~sk_padim.make_defect_textures` in the MVTec AD layout.

    Images and masks are written as lossless PNG files named ``000.png``,
    ``001.png``, ... (masks ``000_mask.png``, 0 or 255), so :func:`load_mvtec_ad`
    reads back the same images, labels and masks in the same order.

    Parameters
    ----------
    dataset : mapping of str to Bunch
        Category name to a Bunch with ``X_train``, ``X_test``, ``masks_test`` and
        ``defect_types_test``, as returned by :func:`~sk_padim.make_defect_textures`.
    root : str or path-like
        Folder to write into; created if needed. Each category goes to
        ``<root>/<category>``, which must not exist yet.

    Returns
    -------
    root : pathlib.Path
        The folder written into.

    Raises
    ------
    FileExistsError
        If ``<root>/<category>`` already exists (its old files would mix with the
        new ones); remove it or choose another root.

    See Also
    --------
    load_mvtec_ad : Read a category back.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.datasets import write_mvtec_layout
    >>> dataset = make_defect_textures(categories="grass", n_train=5, random_state=0)
    >>> root = write_mvtec_layout(dataset, tempfile.mkdtemp())
    >>> sorted(p.name for p in (root / "grass").iterdir())
    ['ground_truth', 'test', 'train']
    >>> sorted(p.name for p in (root / "grass" / "train" / "good").iterdir())
    ['000.png', '001.png', '002.png', '003.png', '004.png']
    """
    root = Path(root)
    for category, bunch in dataset.items():
        category_dir = root / category
        if category_dir.exists():
            raise FileExistsError(
                f"{category_dir} already exists; remove it or choose another root."
            )
        _write_pngs(bunch.X_train, category_dir / "train" / _GOOD)
        for kind in np.unique(bunch.defect_types_test):
            selected = bunch.defect_types_test == kind
            _write_pngs(bunch.X_test[selected], category_dir / "test" / kind)
            if kind != _GOOD:
                masks = bunch.masks_test[selected].astype(np.uint8) * 255
                _write_pngs(masks, category_dir / "ground_truth" / kind, _MASK_SUFFIX)
    return root


def _write_pngs(images: np.ndarray, folder: Path, suffix: str = ".png") -> None:
    folder.mkdir(parents=True)
    digits = max(3, len(str(len(images) - 1)))
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:0{digits}d}{suffix}")
