"""Arrays of rows in files: the statistics and Gaussians that do not fit in memory.

A :class:`RowFile` is a ``(rows, columns)`` array in a ``.npy`` file, read and written a
range of rows at a time with plain file reads and writes rather than a memory mapping:
the pages read stay in the operating system's cache, not in the process's resident
memory, so a fit's resident memory stays at one chunk of rows whatever the file's size.
Rows here are positions of the feature grid, the unit every fit and scoring step
already works in.

A :class:`StoreFolder` holds the files of one fit in a subfolder of the folder the user
names. The subfolder is marked complete only once the fit has written everything; a fit
that fails or is interrupted deletes its subfolder, and the next fit in the folder
deletes any subfolder a killed process left unmarked, so nothing half-written is ever
read as a model's arrays. A completed fit deletes the files of the fits before it.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = ["RowFile", "StoreFolder"]

COMPLETE = "COMPLETE"  # the marker file of a fit that wrote all its arrays


class RowFile:
    """A ``(rows, columns)`` array in a ``.npy`` file, read and written by ranges of rows.

    Make one with :meth:`create`. Indexing with a slice of rows reads them into a new
    CPU tensor; assigning to a slice writes them. Threads may read and write at once
    (each access holds this file's own lock for the duration of its system call).

    Parameters
    ----------
    path : str or Path
        An existing ``.npy`` file of a 2-D array.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from sk_padim.core.store import RowFile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     rows = RowFile.create(Path(folder) / "a.npy", (4, 3), torch.float32)
    ...     rows[1:3] = torch.ones(2, 3)
    ...     print(rows[0:3].sum(dim=1))
    ...     rows.close()
    tensor([0., 3., 3.])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "r+b")  # noqa: SIM115 (kept open; closed by close)
        major, _ = np.lib.format.read_magic(self._file)
        read_header = {1: np.lib.format.read_array_header_1_0}.get(
            major, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(self._file)
        if len(shape) != 2 or fortran:
            self._file.close()
            raise ValueError(f"{self.path} does not hold a C-ordered 2-D array.")
        self.shape = tuple(int(size) for size in shape)
        self.numpy_dtype = np.dtype(dtype)
        self._offset = self._file.tell()
        self._row_bytes = self.shape[1] * self.numpy_dtype.itemsize
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int], dtype: torch.dtype) -> RowFile:
        """Create a file of zeros (sparse on most file systems: no bytes written yet).

        Parameters
        ----------
        path : str or Path
            The new ``.npy`` file.
        shape : (int, int)
            Rows and columns.
        dtype : torch.dtype
            ``torch.float32`` or ``torch.float64``.

        Returns
        -------
        rows : RowFile
            The open file.
        """
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        header = {"descr": np.lib.format.dtype_to_descr(numpy_dtype), "fortran_order": False}
        header["shape"] = tuple(int(size) for size in shape)
        with open(path, "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            file.truncate(file.tell() + int(np.prod(shape)) * numpy_dtype.itemsize)
        return cls(path)

    @property
    def dtype(self) -> torch.dtype:
        """The values' torch dtype."""
        return torch.from_numpy(np.empty(0, self.numpy_dtype)).dtype

    @property
    def device(self) -> torch.device:
        """Rows are read into CPU tensors."""
        return torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def _span(self, rows: slice) -> tuple[int, int]:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("A RowFile reads and writes contiguous ranges of rows only.")
        return start, max(start, stop)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop = self._span(rows)
        values = np.empty((stop - start, self.shape[1]), self.numpy_dtype)
        with self._lock:
            self._file.seek(self._offset + start * self._row_bytes)
            read = self._file.readinto(memoryview(values).cast("B"))
        if read != values.nbytes:
            raise OSError(f"{self.path} is shorter than its header says: a truncated file.")
        return torch.from_numpy(values)

    def __setitem__(self, rows: slice, values: torch.Tensor) -> None:
        start, stop = self._span(rows)
        data = np.ascontiguousarray(torch.as_tensor(values).cpu().numpy(), self.numpy_dtype)
        if data.shape != (stop - start, self.shape[1]):
            raise ValueError(f"Cannot write values of shape {data.shape} into {stop - start} rows.")
        with self._lock:
            self._file.seek(self._offset + start * self._row_bytes)
            self._file.write(memoryview(data).cast("B"))

    def array(self) -> np.ndarray:
        """Give the whole array, memory-mapped read-only (for pickling and saving).

        Returns
        -------
        array : numpy.memmap of shape ``shape``
            The file's values, read as they are used.
        """
        self._file.flush()
        return np.load(self.path, mmap_mode="r")

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __reduce__(self):
        raise TypeError(
            f"A RowFile ({self.path}) is a file of this machine; pickle the arrays of "
            "what holds it (PatchStatistics, PatchGaussians) instead."
        )

    def __repr__(self) -> str:
        return f"RowFile({str(self.path)!r}, shape={self.shape}, dtype={self.numpy_dtype})"


class StoreFolder:
    """The files of one fit, in a new subfolder of a folder the user names.

    Parameters
    ----------
    folder : str or Path
        Created if needed. One fit at a time should use it: a fit deletes the unmarked
        subfolders it finds (those of killed fits) when it starts, and the subfolders of
        earlier fits when it completes.

    Examples
    --------
    >>> import tempfile, torch
    >>> from sk_padim.core.store import StoreFolder
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     store = StoreFolder(folder)
    ...     rows = store.create("scatter", (2, 3), torch.float32)
    ...     store.complete()
    ...     print(StoreFolder.is_complete(store.path), rows.shape)
    ...     rows.close()
    True (2, 3)
    """

    def __init__(self, folder: str | os.PathLike):
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        for old in _fit_folders(root):
            if not self.is_complete(old):
                shutil.rmtree(old, ignore_errors=True)
        self.path = root / f"fit-{uuid.uuid4().hex}"
        self.path.mkdir()

    def create(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> RowFile:
        """Create a file of zeros in this fit's subfolder.

        Parameters
        ----------
        name : str
            The file's name, without ``.npy``.
        shape : (int, int)
            Rows and columns.
        dtype : torch.dtype
            The values' type.

        Returns
        -------
        rows : RowFile
            The open file.
        """
        return RowFile.create(self.path / f"{name}.npy", shape, dtype)

    def complete(self) -> None:
        """Mark this fit's files complete and delete those of earlier fits."""
        marker = self.path / COMPLETE
        marker.with_suffix(".tmp").write_text("")
        os.replace(marker.with_suffix(".tmp"), marker)
        for old in _fit_folders(self.path.parent):
            if old != self.path:
                shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Delete this fit's files (a fit that failed or was interrupted)."""
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """Tell whether a subfolder holds the files of a fit that completed.

        Parameters
        ----------
        path : str or Path
            A fit's subfolder.

        Returns
        -------
        complete : bool
            True once the fit marked it complete.
        """
        return (Path(path) / COMPLETE).is_file()


def tensor_of(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of an array: a tensor as it is, a NumPy array shared, or copied when it is
    read-only (a memory-mapped file)."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _fit_folders(root: Path) -> list[Path]:
    return [path for path in root.glob("fit-*") if path.is_dir()]
