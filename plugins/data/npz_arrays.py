"""Arrays of an ``.npz`` file read lazily: headers first, data only as batches ask for it.

``numpy.load`` on an ``.npz`` decompresses a whole array when it is first indexed, so a
small archive can expand to gigabytes before anything is checked. Here an archive member
is opened by its ``.npy`` header alone (shape, dtype: checked before any data is read), and

- a stored (uncompressed) member is memory-mapped in place;
- a compressed member serves reads of its first rows by decompressing just those rows, and
  anything else from a copy decompressed once, in chunks, into a temporary file that is
  memory-mapped (memory stays flat whatever the array's size).

Object arrays are refused from the header: reading them would unpickle code.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np

PREFIX_BYTES = 16 * 2**20  # reads within the first 16 MiB of a compressed member decompress only that much


class NpyMember:
    """One ``<key>.npy`` member of an archive: ``shape``, ``dtype`` and row reads by index."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, key: str):
        self.path, self.key = path, key
        self.info = archive.getinfo(f"{key}.npy")
        with archive.open(self.info) as stream:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"array '{key}' is in .npy format version {version}, which cannot be read lazily")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            self.shape, fortran, self.dtype = read_header(stream)
            self.header_bytes = stream.tell()
        self.order = "F" if fortran else "C"
        self._mapped: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        if self._mapped is None and self.info.compress_type != zipfile.ZIP_STORED and self.order == "C" \
                and indices.size and (int(indices.max()) + 1) * row_bytes <= PREFIX_BYTES:
            return self._prefix(int(indices.max()) + 1)[indices]
        return np.asarray(self._array()[indices])

    def _prefix(self, rows: int) -> np.ndarray:
        """The first *rows* rows, decompressing only them."""
        with zipfile.ZipFile(self.path) as archive, archive.open(self.info) as stream:
            stream.seek(self.header_bytes)
            data = stream.read(rows * math.prod(self.shape[1:]) * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype).reshape((rows, *self.shape[1:]))

    def _array(self) -> np.ndarray:
        if self._mapped is None:
            if self.info.compress_type == zipfile.ZIP_STORED:
                self._mapped = np.memmap(self.path, self.dtype, "r", self._data_offset(), self.shape, self.order)
            else:
                self._mapped = self._decompressed_copy()
        return self._mapped

    def _data_offset(self) -> int:
        """Where a stored member's array data starts in the file (after its local header and .npy header)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.info.header_offset)
            local = handle.read(30)
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        return self.info.header_offset + 30 + name_length + extra_length + self.header_bytes

    def _decompressed_copy(self) -> np.ndarray:
        handle, name = tempfile.mkstemp(prefix="layerscope-npz-", suffix=".npy")
        with os.fdopen(handle, "wb") as target, zipfile.ZipFile(self.path) as archive, \
                archive.open(self.info) as stream:
            stream.seek(self.header_bytes)
            shutil.copyfileobj(stream, target, 2**20)
        mapped = np.memmap(name, self.dtype, "r", 0, self.shape, self.order)
        weakref.finalize(mapped, os.unlink, name)
        return mapped
