"""Files that appear whole or not at all: written to a temporary name, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` (replacing it) only once fully written.

    The data go to a temporary file in the same folder, renamed over ``path`` when the
    block ends without an error; an error or an interrupt removes the temporary file,
    so a reader never sees a half-written file under ``path``.

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
