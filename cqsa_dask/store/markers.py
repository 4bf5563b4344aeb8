"""One marker array as the tasks use it: a 0/1 per cell, read and written one cell at a time.

::

    job.task_done[i, b, j]          -> 0 or 1     presence markers: does the cell's chunk exist?
    job.task_done[i, b, j] = 1 | 0                 zarr: 1 writes the chunk, 0 deletes it

A presence-marker array (``chunkio.MARKERS_ATTR``) holds a chunk exactly
where a marker is 1, so reading one marker is asking whether its chunk
exists (``ChunkIO.exists``): one request on an object store (a one-byte
ranged GET, ``zarrio.py``), a ``stat`` on a local one.  Through zarr the
same read costs more on S3: s3fs asks for the object's size before each
whole-object GET (a HEAD), and for an absent key adds a listing to tell a
missing key from a directory, so an unset marker cost two requests and a
set one two.  Arrays of other layouts (an older engine's stored zeros) are
read and written through zarr.  A cell of a presence-marker array is
written the same way it is read, through the chunk IO: 1 writes its chunk
(``ChunkIO.write``), 0 deletes it; ``read_all`` reads every marker in bulk
(``chunkio.read_markers``: one listing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from cqsa_dask.store.chunkio import MARKERS_ATTR, chunk_io, read_markers

__all__ = ["Markers"]


class Markers:
    """The marker array ``arr`` (uint8, one chunk per cell) with cell reads by chunk presence."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.presence = arr.attrs.get(MARKERS_ATTR) == "presence" and arr.chunks == (1,) * arr.ndim
        self._io = chunk_io(arr) if self.presence else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.arr.shape)

    def __getitem__(self, index: Any) -> Any:
        cell = index if isinstance(index, tuple) else (index,)
        if self._io is not None and len(cell) == self.arr.ndim and all(isinstance(i, (int, np.integer)) for i in cell):
            coords = tuple(int(i) % n for i, n in zip(cell, self.arr.shape, strict=True))  # negative: from the end
            return np.uint8(self._io.exists(coords))
        return self.arr[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        cell = index if isinstance(index, tuple) else (index,)
        if (self._io is not None and len(cell) == self.arr.ndim and value in (0, 1)
                and all(isinstance(i, (int, np.integer)) for i in cell)):
            coords = tuple(int(i) % n for i, n in zip(cell, self.arr.shape, strict=True))
            if value:  # the cell's chunk written (one file, renamed into place on a local store),
                self._io.write(coords, np.array(1, np.uint8))
            else:  # or deleted: what zarr does for these arrays, without its round trips
                self._io.delete(coords)
            return
        self.arr[index] = value

    def read_all(self) -> np.ndarray:
        """Every marker at once (uint8 0/1, the array's shape)."""
        return read_markers(self.arr)
