"""Sessions: one cluster and one work directory kept across many attention calls.

A model calls attention once per layer per forward pass; starting a cluster
and a temporary directory for each call would cost more than many of the
calls themselves.  A :class:`Session` holds both for as long as it is open::

    with cqsa_dask.Session(memory_budget="256MB") as s:      # cluster + workdir start here
        out = cqsa_dask.attention(q, k, v, causal=True)      # uses s.client, s.workdir, s.memory_budget
        logits = model(input_ids).logits                     # every layer's call, the same
                                                             # cluster and directory stop here
Policy and invariants:
  - The current session is a context variable: per thread and per asyncio
    task, set by ``__enter__``, restored by ``__exit__``; sessions nest, the
    innermost is current.  Outside any session nothing changes.
  - Arguments given to a call win over the session's; the session fills in
    only what the call leaves as None (:func:`session_defaults`).
  - The client is the caller's (never closed here), a client of ``scheduler``,
    or a new local cluster advertising the session's budget as the worker
    resource; only what the session started is closed at exit.
  - The work directory is a new ``cqsa-session-*`` directory under
    ``workdir`` (default: the system's temporary directory), removed with all
    it holds at exit.  Each call's job store is a subdirectory of it, removed
    once ``out`` and ``lse`` are read back, so a forward pass holds one
    layer's store at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from cqsa_dask import config
from cqsa_dask.core.errors import InvalidInputError
from cqsa_dask.core.units import parse_budget

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["Session", "current_session", "session_defaults"]

_CURRENT: contextvars.ContextVar[Session | None] = contextvars.ContextVar("cqsa_session", default=None)


class Session:
    """A cluster and a work directory shared by the attention calls made while it is open.

    Args:
        client: an existing Client to use (not closed by the session).
        scheduler: address of a Dask scheduler to connect to (closed at exit).
            Neither: a local cluster (``cqsa.local-cluster``) is started on
            entry, its workers advertising ``memory_budget`` bytes of the
            ``cqsa.resource`` resource, and closed at exit.
        workdir: directory under which the session's work directory is made
            (default: the system's temporary directory).
        memory_budget: per-worker device memory for calls that do not give
            one: bytes or "512MB" (default: what ``attention`` uses alone).
    """

    def __init__(self, client: Client | None = None, scheduler: str | None = None,
                 workdir: str | os.PathLike[str] | None = None, memory_budget: int | str | None = None):
        if client is not None and scheduler is not None:
            raise InvalidInputError("give a Session either client= or scheduler=, not both")
        if memory_budget is not None:
            parse_budget(memory_budget)  # bad input fails here, not at the first call
        self._client_arg = client
        self._scheduler = scheduler
        self._parent = workdir
        self.memory_budget = memory_budget
        self._client: Client | None = None
        self._workdir: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._token: contextvars.Token[Session | None] | None = None

    @property
    def client(self) -> Client:
        """The session's Dask client (open sessions only)."""
        if self._client is None:
            raise InvalidInputError("the Session is not open: use it as `with Session(...) as s:`")
        return self._client

    @property
    def workdir(self) -> str:
        """The session's own work directory (open sessions only)."""
        if self._workdir is None:
            raise InvalidInputError("the Session is not open: use it as `with Session(...) as s:`")
        return self._workdir

    def open(self) -> Self:
        """Start (or connect to) the cluster and make the work directory; it does not make
        the session current (``with Session(...)`` or :meth:`current` do)."""
        if self._stack is not None:
            raise InvalidInputError("this Session is already open; a Session is opened once")
        from cqsa_dask.client.api import plan_options
        from cqsa_dask.client.cluster import connect

        stack = contextlib.ExitStack()
        try:
            self._workdir = tempfile.mkdtemp(prefix="cqsa-session-", dir=self._parent)
            stack.callback(shutil.rmtree, self._workdir, True)
            opts = plan_options()
            budget = parse_budget(self.memory_budget if self.memory_budget is not None
                                  else config.get("memory-budget"))
            self._client = stack.enter_context(connect(
                self._client_arg, self._scheduler, budget_bytes=budget, resource=str(config.get("resource")),
                threads=int(opts["tasks_in_flight"]) + int(opts["host_staging"])))
        except BaseException:
            stack.close()
            self._workdir = self._client = None
            raise
        self._stack = stack
        return self

    @contextlib.contextmanager
    def current(self) -> Iterator[Self]:
        """Make this open session the current one inside the ``with`` block."""
        if self._stack is None:
            raise InvalidInputError("the Session is not open: use it as `with Session(...) as s:`")
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def __enter__(self) -> Self:
        self.open()
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close what the session started and remove its directory (and, when it was entered
        with ``with``, restore the session current before it).  Closing twice does nothing."""
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                stack.close()
        finally:
            self._client = self._workdir = None

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` ran and :meth:`close` has not."""
        return self._stack is not None

    def __repr__(self) -> str:
        state = f"workdir={self._workdir!r}" if self._workdir else "closed"
        return f"Session({state}, memory_budget={self.memory_budget!r})"


def current_session() -> Session | None:
    """The innermost open session of this thread / task, or None."""
    return _CURRENT.get()


def session_defaults(client: Any, workdir: Any, memory_budget: Any) -> tuple[Any, Any, Any, bool]:
    """Fill what a call left as None from the current session.

    Returns (client, workdir, memory_budget, keep_store): ``keep_store`` is
    True only when the caller chose the work directory, so a store under a
    session's (or a temporary) directory is removed after the call.
    """
    keep = workdir is not None
    s = current_session()
    if s is None:
        return client, workdir, memory_budget, keep
    return (client if client is not None else s.client,
            workdir if workdir is not None else s.workdir,
            memory_budget if memory_budget is not None else s.memory_budget, keep)
