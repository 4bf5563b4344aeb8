"""Session: one cluster and one work directory across attention calls (a threaded local cluster).

Drawn::

    with Session(client=c, memory_budget="3MB") as s:   s is current; s.workdir exists
        attention(q, k, v)                              -> c, a store under s.workdir (W = 7), removed after
        attention(q, k, v, memory_budget=...)           -> the call's budget wins
    (exit)                                              s.workdir removed; no current session
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Inputs
from distributed import Client, LocalCluster, get_task_stream
from reference import check_exact

import cqsa_dask
from cqsa_dask.client.session import current_session, session_defaults


@pytest.fixture(scope="module")
def threaded() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"device_mem": 1e9},
                      dashboard_address=":0") as lc, Client(lc) as c:
        yield c


def test_calls_in_a_session_share_its_client_and_directory(threaded: Client, tmp_path: Path,
                                                           make_inputs: Callable[..., Inputs]) -> None:
    inp = make_inputs(1, 4, 2, 1500, 16, magnitude=3.0)
    tasks = []
    with cqsa_dask.Session(client=threaded, workdir=tmp_path, memory_budget="3MB") as s:
        assert current_session() is s and Path(s.workdir).parent == tmp_path
        for _ in range(2):
            with get_task_stream(client=threaded) as ts:  # tasks the session's client ran
                out = cqsa_dask.attention(inp.q, inp.k, inp.v, causal=True)
            tasks.append(len(ts.data))
            check_exact(inp.q, inp.k, inp.v, out, None, causal=True, scale=None, context=inp.ctx)
            assert os.listdir(s.workdir) == []  # the call's store is gone once out is read back
        workdir = s.workdir
    assert all(n >= 7 for n in tasks), tasks  # W = 7 under the session's 3 MB: at least 7 quorum tasks each
    assert current_session() is None and not os.path.exists(workdir)
    assert threaded.status == "running"  # the caller's client outlives the session


def test_call_arguments_win_and_sessions_nest(threaded: Client, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    with cqsa_dask.Session(client=threaded, memory_budget="3MB") as outer:
        assert session_defaults(None, None, None) == (threaded, outer.workdir, "3MB", False)
        assert session_defaults(None, mine, "5MB") == (threaded, mine, "5MB", True)
        with cqsa_dask.Session(client=threaded, memory_budget="4MB") as inner:
            assert current_session() is inner
        assert current_session() is outer
    assert session_defaults(None, None, None) == (None, None, None, False)


def test_bad_sessions_refused(threaded: Client) -> None:
    with pytest.raises(cqsa_dask.InvalidInputError, match="either client= or scheduler="):
        cqsa_dask.Session(client=threaded, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError):
        cqsa_dask.Session(memory_budget="lots")
    s = cqsa_dask.Session(client=threaded)
    with pytest.raises(cqsa_dask.InvalidInputError, match="not open"):
        _ = s.client
    with s, pytest.raises(cqsa_dask.InvalidInputError, match="already open"):
        s.open()
