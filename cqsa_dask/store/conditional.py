"""Compare-and-swap of a group's attributes on object stores with conditional writes (S3's If-Match).

::

    swap = attribute_swap(group)      None: no conditional writes known for this store
    version = swap.read()             HEAD of GROUP/zarr.json (its ETag), then GET (the document)
    swap.write(version, new_attrs)    PUT GROUP/zarr.json with If-Match: version.etag
                                        -> False when anyone wrote it since that HEAD (HTTP 412),
                                           or wrote it conditionally at the same moment (AWS: 409)

A PUT with ``If-Match`` succeeds only while the object is still the version
whose ETag the HEAD returned, so the document the GET returned in between is
that version too (a write in between changes the ETag and fails the PUT):
read, decide, write is one atomic step, without a lock.  The lease
(``jobstate.Lease``) uses it to claim a store: of two runs claiming at once,
one write fails.

Supported: zarr's ``FsspecStore`` over s3fs, i.e. ``s3://`` URLs.  AWS S3
honours ``If-Match`` on PutObject (since November 2024), as do moto (the
tests' server) and MinIO; a server that ignores the header turns the write
into a plain PUT, and two claims at the same moment could then both
succeed.  Every other store returns None (local directories take an
``flock``, others settle and re-read: ``jobstate``).

Only the group's ``attributes`` change; the rest of the document (format,
node type) is written back as read.  A group object opened before a swap
caches the old attributes: reopen it to see the new ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.core.sync import sync as zarr_sync

__all__ = ["AttributeSwap", "Version", "attribute_swap"]


def _is_s3(fs: Any) -> bool:
    try:
        import s3fs
    except ImportError:
        return False
    return isinstance(fs, s3fs.S3FileSystem)


_LOST = {"PreconditionFailed": 412, "ConditionalRequestConflict": 409}


def _precondition_failed(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it: s3fs turns botocore's ClientError into an OSError) says the
    conditional write did not happen: HTTP 412 (the condition did not hold) or 409 (AWS: another
    conditional write of the key was in progress)."""
    seen: BaseException | None = e
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error, meta = response.get("Error", {}), response.get("ResponseMetadata", {})
            if error.get("Code") in _LOST or meta.get("HTTPStatusCode") in _LOST.values():
                return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class Version:
    """One version of a group's ``zarr.json``: the document (JSON object) and its ETag."""

    doc: dict[str, Any]
    etag: str

    @property
    def attrs(self) -> dict[str, Any]:
        """The group's attributes in this version."""
        return dict(self.doc.get("attributes") or {})


class AttributeSwap:
    """Conditional reads and writes of one group's ``zarr.json`` on an S3 file system (see the
    module docstring)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def read(self) -> Version:
        """The document as stored now and its ETag (a HEAD, then a GET)."""
        self.fs.invalidate_cache(self.path)
        etag = str(zarr_sync(self.fs._info(self.path))["ETag"])
        return Version(json.loads(zarr_sync(self.fs._cat_file(self.path))), etag)

    def write(self, version: Version, attrs: dict[str, Any]) -> bool:
        """Replace the attributes of ``version`` with ``attrs`` if the stored document is still
        that version (one PUT, True); False when it changed since (nothing written)."""
        doc = {**version.doc, "attributes": attrs}
        try:
            zarr_sync(self.fs._pipe_file(self.path, json.dumps(doc, indent=2).encode(), IfMatch=version.etag))
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True


def attribute_swap(group: zarr.Group) -> AttributeSwap | None:
    """The compare-and-swap of ``group``'s attributes, or None where the store has no
    conditional writes known here (anything but s3fs)."""
    store = group.store_path.store
    fs, root = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is None or root is None or not _is_s3(fs):
        return None
    parts = [p for p in (str(root).strip("/"), group.store_path.path.strip("/"), "zarr.json") if p]
    return AttributeSwap(fs, "/".join(parts))
