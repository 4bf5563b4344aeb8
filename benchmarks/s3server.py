"""A real S3 server that counts the requests it answers: moto's server app behind a counting WSGI layer.

::

    python -m benchmarks.s3server --port P          (one process; counting_s3() starts it)
        werkzeug (threaded) ──> Counting ──> moto's S3 app (DomainDispatcherApplication)
                                   │  each request: its type and the array it touches, then moto answers
                                   ├─ GET    /_counts   the counts so far, JSON
                                   └─ DELETE /_counts   start counting from zero

Request types, as S3 bills and limits them:

    LIST    GET on a bucket (ListObjects / ListObjectsV2)
    GET     GET of an object                 HEAD    HEAD of an object or a bucket
    PUT     PUT of an object (or a bucket)   DELETE  DELETE of an object, or a multi-object
                                                     delete (POST ?delete: one request)
    other   anything else, by its method

The array of a request is its key with the bucket and the chunk part
(``/c/...``) removed, e.g. ``job.zarr/_cqsa/task_done`` (``.../zarr.json``
for metadata); for a LIST, its prefix.  Counting happens in the server
process, so every client (the CLI, its worker processes, a test) is
counted alike.  No bucket can be named ``_counts`` (S3 bucket names start
with a letter or digit), so the control path never shadows S3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = ["CountingS3", "RequestCounts", "counting_s3", "request_kind"]

CONTROL = "/_counts"
TYPES = ("GET", "PUT", "HEAD", "LIST", "DELETE")


def request_kind(method: str, path: str, query: str) -> tuple[str, str]:
    """(type, array) of a path-style S3 request (see the module docstring)."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    params = parse_qs(query, keep_blank_values=True)
    if method == "GET" and not key and bucket:
        prefix = params.get("prefix", [""])[0]
        return "LIST", prefix.rstrip("/") or "(bucket)"
    if method == "POST" and "delete" in params:
        return "DELETE", "(multi-object delete)"
    kind = method if method in TYPES else f"other {method}"
    head, sep, _ = key.partition("/c/")
    return kind, (head if sep else key) or "(bucket)"


class _Counting:
    """WSGI middleware: count, then hand the request to moto."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str, int]] = Counter()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == CONTROL:
            return self._control(method, start_response)
        kind, where = request_kind(method, path, environ.get("QUERY_STRING", ""))
        status: list[int] = []

        def recorded(code: str, headers: Any, *args: Any) -> Any:
            status.append(int(code.split()[0]))
            return start_response(code, headers, *args)

        body = self.app(environ, recorded)
        with self.lock:
            self.counts[(kind, where, status[0] if status else 0)] += 1
        return body

    def _control(self, method: str, start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            rows = [[k, w, s, n] for (k, w, s), n in sorted(self.counts.items())]
            if method == "DELETE":
                self.counts.clear()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(rows).encode()]


def serve(host: str, port: int) -> None:
    """Serve moto's S3 behind the counter until killed."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _Counting(DomainDispatcherApplication(create_backend_app))
    make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


@dataclass(frozen=True)
class RequestCounts:
    """Requests a server answered: rows (type, array, HTTP status, count)."""

    rows: tuple[tuple[str, str, int, int], ...]

    def by_type(self, where: Callable[[str], bool] = lambda _: True) -> dict[str, int]:
        """Requests per type (every type of ``TYPES`` present), of the arrays ``where`` accepts."""
        out = dict.fromkeys(TYPES, 0)
        for kind, array, _status, n in self.rows:
            if where(array):
                out[kind] = out.get(kind, 0) + n
        return out

    def by_array(self, prefix: str = "") -> dict[str, dict[str, int]]:
        """{array relative to ``prefix``: {type: requests}}."""
        out: dict[str, dict[str, int]] = {}
        for kind, array, _status, n in self.rows:
            name = array[len(prefix):].lstrip("/") if array.startswith(prefix) else array
            out.setdefault(name or "(root)", {}).setdefault(kind, 0)
            out[name or "(root)"][kind] += n
        return out

    def failed(self) -> dict[int, int]:
        """Requests per HTTP status of 400 and above (404 of an absent key, 412 of a failed condition)."""
        out: Counter[int] = Counter()
        for _kind, _array, status, n in self.rows:
            if status >= 400:
                out[status] += n
        return dict(out)

    @property
    def total(self) -> int:
        return sum(n for *_, n in self.rows)


@dataclass(frozen=True)
class CountingS3:
    """A running counting server: its endpoint and its counts."""

    endpoint: str

    def counts(self, reset: bool = False) -> RequestCounts:
        """What the server answered since the last reset (and reset now, when ``reset``)."""
        req = urllib.request.Request(self.endpoint + CONTROL, method="DELETE" if reset else "GET")
        with urllib.request.urlopen(req, timeout=30) as r:
            return RequestCounts(tuple((str(k), str(w), int(s), int(n)) for k, w, s, n in json.load(r)))

    def reset(self) -> None:
        self.counts(reset=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def counting_s3(buckets: Iterable[str] = ("cqsa",), key: str = "test-key", secret: str = "test-secret",
                timeout: float = 60.0) -> Iterator[CountingS3]:
    """Start the counting server in its own process on a free local port, create ``buckets``,
    reset the counts, yield it; stop it on exit."""
    port = _free_port()
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.s3server", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = CountingS3(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                server.counts()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the counting S3 server did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        import boto3

        s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name="us-east-1")
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        server.reset()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
