"""The files the package writes: whole or not at all, and named after their images.

- :func:`atomic_file`: a file written to a temporary name, then renamed.
- :func:`output_names`: the name of each image's output files (pictures, maps).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

__all__ = ["atomic_file", "output_names"]


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` (replacing it) only once fully written.

    The data go to a temporary file in the same folder, renamed over ``path`` when the
    block ends without an error; an error or an interrupt removes the temporary file,
    so a reader never sees a half-written file under ``path``.

    Parameters
    ----------
    path : str or path-like
        The file to write; its folder must exist.

    Yields
    ------
    file : binary file object
        The temporary file, open for writing.

    Examples
    --------
    >>> import os, tempfile
    >>> from sk_padim.files import atomic_file
    >>> path = os.path.join(tempfile.mkdtemp(), "data.bin")
    >>> with atomic_file(path) as file:
    ...     _ = file.write(b"complete")
    >>> open(path, "rb").read()
    b'complete'
    """
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
        umask = os.umask(0)  # mkstemp makes the file private; use the usual permissions
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Name each image's output files (pictures, maps): unique, flat and readable names.

    The pictures of ``sk-padim score --heatmaps`` and the maps of
    ``sk_padim.dask.score_distributed(heatmap_dir=...)`` are named so. Each name is the
    image's path relative to the folder that holds all the images, without its suffix,
    with ``/`` replaced by ``_`` (``good/000.png`` gives ``good_000``). A name already
    given gets ``-2``, ``-3``, ... appended, in the order of ``paths``, so no two images
    share a name.

    Parameters
    ----------
    paths : sequence of str or path-like
        Image file paths.

    Returns
    -------
    names : list of str
        One name per path, in the same order.

    Examples
    --------
    >>> from sk_padim.files import output_names
    >>> output_names(["test/good/000.png", "test/hole/000.png", "test/hole/000.jpg"])
    ['good_000', 'hole_000', 'hole_000-2']
    """
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    root = os.path.commonpath(folders) if folders else ""
    names: list[str] = []
    taken: set[str] = set()
    repeats: dict[str, int] = {}
    for path in paths:
        base = os.path.splitext(os.path.relpath(os.path.abspath(path), root))[0]
        base = name = base.replace(os.sep, "_")
        while name in taken:  # also when an image is itself named like a repeat, "a-2"
            repeats[base] = repeats.get(base, 1) + 1
            name = f"{base}-{repeats[base]}"
        taken.add(name)
        names.append(name)
    return names
