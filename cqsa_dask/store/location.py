"""Where the job's store is: the one parser of store arguments, and the picklable description it returns.

::

    run(store, storage_options=)   attention(..., store=)   cqsa run STORE --storage-options JSON
                        │
                  parse_store()          the only code that looks inside a store argument
                        │
                  StoreLocation          frozen, hashable, picklable: every task carries one
         ┌──────────────┼───────────────────┐
       local            url                 object
    /abs/path.zarr   s3://b/job.zarr      a zarr Store instance
                     + storage_options    (pickled with the task)

Policy:

- A ``str`` or ``os.PathLike`` with a scheme (``s3://``, ``gs://``, ...) is a
  URL, opened by zarr through fsspec with ``storage_options``; without options
  an ``s3://`` URL uses the standard AWS environment (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), as s3fs
  does, read where the store is opened: by the client and by every worker
  process (a local cluster's workers inherit the client's environment).
  ``file://`` URLs and plain paths are local paths, made absolute (worker
  processes may run in another directory).  ``storage_options`` go with
  URLs only.
- A writable ``zarr.storage.LocalStore`` is its root path.  Any other zarr
  ``Store`` is kept as given and must pickle (tasks carry it to workers).
- An in-memory store (``zarr.storage.MemoryStore``, a ``memory://`` URL)
  lives in the process that made it: it works with a threaded cluster
  (``LocalCluster(processes=False)``, or ``cqsa.local-cluster.processes:
  false``).  ``run`` refuses it (:class:`InvalidInputError`) before writing
  anything when the workers are other processes (``check_processes``), and
  a location unpickled in another process refuses to open.
- Opening an existing group (``open_group``) never creates anything: a missing
  path, an unreachable endpoint, refused credentials or a missing bucket are a
  :class:`StoreError` with the fix.  Equality and hashing use a key made at
  parse time, so one location opens one job per process (``layout.open_job``).
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import zarr
import zarr.errors
import zarr.storage
from zarr.abc.store import Store

from cqsa_dask.core.errors import CQSAError, InvalidInputError, StoreError

__all__ = ["OpenMode", "StoreLike", "StoreLocation", "parse_store"]

Kind = Literal["local", "url", "object"]
OpenMode = Literal["r", "r+"]
#: What ``run``, ``attention``, ``verify`` and the CLI accept as a store.
StoreLike: TypeAlias = "str | os.PathLike[str] | Store | StoreLocation"

# In-memory stores of this process, by location key: a location pickled and unpickled in the
# same process (a threaded cluster) finds its store here; another process does not.  Weak: a
# store lives as long as a location (or the user) holds it.
_IN_MEMORY: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


@dataclass(frozen=True, eq=False, repr=False)
class StoreLocation:
    """A parsed store argument (make one with :func:`parse_store`).

    Frozen and picklable.  ``kind`` is "local" (``target`` an absolute path),
    "url" (``target`` the URL, with ``storage_options``) or "object" (a zarr
    Store instance; ``target`` its repr, for messages only).  Equal locations
    have equal keys (``_key``: kind, target and options; a Store object's
    parse gets its own).
    """

    kind: Kind
    target: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    _key: str = ""
    _pid: int | None = None  # the process whose memory holds the store (None: any process reaches it)
    _store: Any = None

    @classmethod
    def _make(cls, kind: Kind, target: str, storage_options: Mapping[str, Any] | None = None, *,
              store: Any = None, process_local: bool = False) -> StoreLocation:
        options = dict(storage_options or {})
        key = f"{kind}:{target}:{json.dumps(options, sort_keys=True, default=repr)}"
        if store is not None:  # an object: one parse, one identity
            key += f":{uuid.uuid4().hex}"
        if process_local and store is not None:
            _IN_MEMORY[key] = store
        return cls(kind, target, options, key, os.getpid() if process_local else None, store)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreLocation) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"StoreLocation({self.kind}, {self.describe()})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._pid is not None:
            state["_store"] = None  # an in-memory store stays in its process (see _IN_MEMORY)
        return state

    # -- what it is ---------------------------------------------------------------

    @property
    def local_root(self) -> Path | None:
        """The directory of a local store; None for URLs and Store objects."""
        return Path(self.target) if self.kind == "local" else None

    @property
    def process_local(self) -> bool:
        """Whether the store lives in one process's memory (usable by a threaded cluster only)."""
        return self._pid is not None

    def describe(self) -> str:
        """The store as messages name it (never the values of ``storage_options``)."""
        if self.kind == "url" and self.storage_options:
            return f"{self.target} (storage options {', '.join(sorted(self.storage_options))})"
        return self.target

    def free_bytes(self) -> int | None:
        """Free bytes of the file system holding a local store (its nearest existing parent); None elsewhere."""
        root = self.local_root
        if root is None:
            return None
        while not root.exists() and root != root.parent:
            root = root.parent
        return shutil.disk_usage(root).free

    def check_processes(self, pids: Iterable[int]) -> None:
        """Raise :class:`InvalidInputError` when the store lives in one process's memory and any of
        ``pids`` (the workers' process ids) is another process."""
        others = sorted({int(p) for p in pids} - {self._pid}) if self._pid is not None else []
        if others:
            raise InvalidInputError(self._elsewhere())

    def _elsewhere(self) -> str:
        return (f"the store {self.describe()} is in the memory of another process: worker processes cannot "
                "reach it; use a threaded cluster (LocalCluster(processes=False), or cqsa.local-cluster.processes: "
                "false) or a store on disk or at a URL")

    # -- opening --------------------------------------------------------------------

    def _zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` is given: a path, a URL or the Store object."""
        if self._pid is not None and self._pid != os.getpid():
            raise InvalidInputError(self._elsewhere())
        if self.kind == "object":
            store = self._store if self._store is not None else _IN_MEMORY.get(self._key)
            if store is None:
                raise StoreError(f"the in-memory store {self.describe()} no longer exists in this process")
            return store
        if self.kind == "url":
            return zarr.storage.FsspecStore.from_url(self.target, storage_options=self.storage_options or None,
                                                     read_only=read_only)
        return self.target

    def open_group(self, mode: OpenMode = "r+") -> zarr.Group:
        """Open the existing Zarr v3 group (``mode`` "r": read only); :class:`StoreError` when there is
        none or the store cannot be reached.  Creates nothing."""
        if self.kind == "local" and not os.path.exists(self.target):
            raise StoreError(f"store {self.target!r} does not exist: give the path of a Zarr v3 group "
                             "(create one with zarr.open_group(path, mode='w'))")
        group = self._open(mode)
        assert group is not None
        return group

    def create_group(self, *, overwrite: bool = False) -> zarr.Group:
        """Create a new, empty Zarr v3 group here and return it.

        ``overwrite``: replace what is there; otherwise a local path must be
        new or an empty directory, and a URL or Store must hold no Zarr node
        (:class:`StoreError`).
        """
        root = self.local_root
        if not overwrite and root is not None and root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreError(f"{self.target!r} exists and is not empty: a new store is created in a new or empty "
                             "directory (remove it or pick another path)")
        group = self._open("w" if overwrite or root is not None else "w-")
        assert group is not None
        return group

    def has_group(self) -> bool:
        """Whether a Zarr group is stored here (False: nothing, or not a group); :class:`StoreError` when the
        store cannot be reached."""
        if self.kind == "local":
            return (Path(self.target) / "zarr.json").is_file()
        return self._open("r", missing_ok=True) is not None

    def _open(self, mode: Literal["r", "r+", "w", "w-"], missing_ok: bool = False) -> zarr.Group | None:
        """The group, opened in ``mode``; None when there is none and ``missing_ok``."""
        where = self.describe()
        try:
            return zarr.open_group(store=self._zarr_store(mode == "r"), mode=mode, zarr_format=3)
        except CQSAError:  # another process's in-memory store: as it is
            raise
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError) as e:
            if mode in ("r", "r+"):  # an array where a group was expected
                raise StoreError(f"store {where} is not a Zarr v3 group but an array: give the group that "
                                 "holds q, k and v") from None
            raise StoreError(f"{where} already holds a Zarr node ({e}): give a new location") from None
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, NotADirectoryError) as e:
            if missing_ok:
                return None
            if mode in ("r", "r+") and self._holds_v2_group():
                how = (f"`zarr migrate v3 {shlex.quote(self.target)}` (zarr-python's command: `pip install 'zarr[cli]'`)"
                       if self.kind != "object" else "zarr.metadata.migrate_v3.migrate_to_v3")
                raise StoreError(f"store {where} is a Zarr v2 group; cqsa reads and writes Zarr v3: add v3 metadata "
                                 f"in place with {how}, which keeps q, k and v's chunks as they are") from None
            hint = ": check the bucket, the path and the credentials" if self.kind == "url" else ""
            raise StoreError(f"store {where} is not a Zarr v3 group (nothing found there{hint}); create one "
                             f"with zarr.open_group(..., mode='w') ({type(e).__name__}: {e})") from None
        except PermissionError as e:
            action = "read" if mode == "r" else "written"
            raise StoreError(f"store {where} cannot be {action}: permission denied ({e}); check the "
                             "credentials or the file permissions") from None
        except ImportError as e:
            raise StoreError(f"store {where} needs an fsspec file system that is not installed ({e}); install "
                             "it, e.g. `pip install s3fs` for s3://") from None
        except (zarr.errors.NodeTypeValidationError, zarr.errors.MetadataValidationError) as e:
            raise StoreError(f"store {where} is not a Zarr v3 group ({type(e).__name__}: {e}); create one "
                             "with zarr.open_group") from None
        except (ValueError, TypeError, KeyError) as e:
            if self.kind == "local":  # unreadable metadata
                raise StoreError(f"store {where} is not a Zarr v3 group ({type(e).__name__}: {e}); create one "
                                 "with zarr.open_group") from None
            raise _unreachable(where, e) from None
        except Exception as e:  # noqa: BLE001  (endpoints, credentials, network: each client has its own errors)
            raise _unreachable(where, e) from None

    def _holds_v2_group(self) -> bool:
        """Whether a Zarr v2 group is stored here (asked only once no v3 group was found)."""
        try:
            zarr.open_group(store=self._zarr_store(True), mode="r", zarr_format=2)
        except Exception:  # noqa: BLE001  (nothing, or nothing readable: the caller's error stands)
            return False
        return True


def _unreachable(where: str, e: BaseException) -> StoreError:
    text = " ".join(str(e).split())[:300]
    return StoreError(f"store {where} cannot be opened ({type(e).__name__}: {text}); check the URL, the "
                      "storage options, the endpoint, the network and the credentials")


def _options(storage_options: Any) -> dict[str, Any]:
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping) or not all(isinstance(k, str) for k in storage_options):
        raise InvalidInputError(f"storage_options must be a mapping of option names to values, got "
                                f"{storage_options!r}")
    return dict(storage_options)


def _from_path(store: str | os.PathLike[str], options: dict[str, Any]) -> StoreLocation:
    text = os.fspath(store)
    if not isinstance(text, str):
        raise InvalidInputError(f"a store path must be text, got {text!r}")
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) < 2 or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        scheme, rest = "", text
    if scheme.lower() == "file":
        scheme = ""
    if not scheme:
        if options:
            raise InvalidInputError(f"storage_options ({', '.join(sorted(options))}) apply to URLs such as "
                                    f"s3://bucket/job.zarr, not to the local path {text!r}; drop them")
        if not rest:
            raise InvalidInputError("the store path is empty: give the path or URL of a Zarr v3 group")
        return StoreLocation._make("local", os.path.abspath(os.path.expanduser(rest)))
    if not rest.strip("/"):
        raise InvalidInputError(f"the store URL {text!r} names no bucket or path: give e.g. s3://bucket/job.zarr")
    return StoreLocation._make("url", text, options, process_local=scheme.lower() == "memory")


def _from_object(store: Any, options: dict[str, Any]) -> StoreLocation:
    if options:
        raise InvalidInputError("storage_options go with a URL; a zarr Store object is already configured: "
                                "drop storage_options")
    if isinstance(store, zarr.storage.LocalStore) and not store.read_only:
        return StoreLocation._make("local", os.path.abspath(str(store.root)))
    if isinstance(store, zarr.storage.MemoryStore):
        return StoreLocation._make("object", repr(store), store=store, process_local=True)
    try:
        pickle.dumps(store)
    except Exception as e:  # noqa: BLE001  (pickling fails in many ways)
        raise InvalidInputError(f"the zarr store {store!r} cannot be pickled ({type(e).__name__}: {e}), so "
                                "tasks cannot carry it to workers: give its path or URL (with "
                                "storage_options) instead") from None
    return StoreLocation._make("object", repr(store), store=store)


def parse_store(store: Any, storage_options: Mapping[str, Any] | None = None) -> StoreLocation:
    """The :class:`StoreLocation` of a store argument: a path (``str`` or ``os.PathLike``), a URL
    (with ``storage_options`` for fsspec), a zarr ``Store`` object, or a :class:`StoreLocation`
    (returned as it is).

    Validates the argument only (:class:`InvalidInputError`); whether a store is there is
    checked when it is opened (:meth:`StoreLocation.open_group`).
    """
    options = _options(storage_options)
    if isinstance(store, StoreLocation):
        if options:
            raise InvalidInputError("storage_options go with a path or URL, not with a parsed StoreLocation")
        return store
    if isinstance(store, (str, os.PathLike)):
        return _from_path(store, options)
    if isinstance(store, Store):
        return _from_object(store, options)
    raise InvalidInputError(f"store must be a path, a URL or a zarr Store, got {type(store).__name__}: {store!r}")
