"""A cluster over ``tls://``: real ``dask scheduler`` and ``dask worker`` processes with certificates.

::

    test CA ──signs──> scheduler.pem, worker.pem, client.pem      (all with their keys)
    rogue CA ─signs──> rogue.pem                                  (same names, another CA)

    dask scheduler --protocol tls --tls-ca-file ca.pem --tls-cert scheduler.pem --tls-key scheduler.key
      <── dask worker tls://... --tls-* worker.pem --resources device_mem=2e9

    Client(address, security=Security(ca, client.pem))     ─> cqsa_dask.run: exact
    `cqsa run --scheduler tls://...` + DASK_DISTRIBUTED__COMM__TLS__* environment ─> exact
    Client with rogue.pem, Client without any certificate   ─> refused within seconds

Distributed's TLS is mutual: each side presents a certificate and accepts only
peers whose certificate the CA file vouches for, so the rogue client (a valid
certificate, the wrong CA) is refused during the handshake, not after.  The
certificates are made here with ``cryptography`` (a dependency of
distributed's TLS support); nothing is read from outside the test.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zarr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.security import Security
from reference import check_exact
from test_integration import DaskProcesses, _free_ports, _spawn, _stop

import cqsa_dask

pytestmark = pytest.mark.integration

B, HQ, HKV, N, D = 1, 2, 1, 1536, 64
BUDGET = "4MB"  # several token groups, so merges run too
RESOURCE = "device_mem"


# ── certificates ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Pair:
    """A PEM certificate file and its private key file."""

    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Pair(path.with_suffix(".pem"), path.with_suffix(".key"))


def _certificate(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (``issuer`` None: self-signed, may sign) or a leaf for 127.0.0.1 signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:
        builder = builder.issuer_name(_name(subject)).add_extension(x509.BasicConstraints(ca=True, path_length=0),
                                                                    critical=True)
        return builder.sign(key, hashes.SHA256()), key
    ca_cert, ca_key = issuer
    builder = (builder.issuer_name(ca_cert.subject)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                              critical=False))
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass(frozen=True)
class Certificates:
    """The test CA's file and the pairs it signed; ``rogue``: signed by another CA."""

    ca: Path
    scheduler: Pair
    worker: Pair
    client: Pair
    rogue: Pair

    def security(self, pair: Pair) -> Security:
        return Security(tls_ca_file=str(self.ca), tls_client_cert=str(pair.cert), tls_client_key=str(pair.key),
                        require_encryption=True)


def make_certificates(d: Path) -> Certificates:
    d.mkdir(parents=True, exist_ok=True)
    ca = _certificate("cqsa test CA", None)
    _write(d / "ca", *ca)
    other_ca = _certificate("another CA", None)
    return Certificates(d / "ca.pem", *(_write(d / n, *_certificate(f"cqsa {n}", ca)) for n in
                                         ("scheduler", "worker", "client")),
                        _write(d / "rogue", *_certificate("cqsa client", other_ca)))


# ── the cluster ──────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaskProcesses, Certificates]]:
    base = tmp_path_factory.mktemp("tls")
    certs = make_certificates(base / "certs")
    port, = _free_ports(1)
    address = f"tls://127.0.0.1:{port}"

    def tls(p: Pair) -> list[str]:
        return ["--tls-ca-file", str(certs.ca), "--tls-cert", str(p.cert), "--tls-key", str(p.key)]

    sched = _spawn(["dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard", *tls(certs.scheduler)], base / "scheduler.log")
    worker = _spawn(["dask", "worker", address, "--nworkers", "1", "--nthreads", "2", "--host", "127.0.0.1",
                     "--resources", f"{RESOURCE}=2e9", "--no-dashboard", "--local-directory", str(base / "scratch"),
                     *tls(certs.worker)], base / "worker.log")
    dp = DaskProcesses(address, 2e9, [sched, worker], base)
    try:
        try:
            with Client(address, security=certs.security(certs.client), timeout="30s") as c:
                c.wait_for_workers(1, timeout=60)
        except Exception as e:
            raise AssertionError(f"TLS cluster at {address} not ready: {e}\n{dp.logs()}") from e
        yield dp, certs
    finally:
        _stop(dp)


def _store(make_inputs, path: Path):  # type: ignore[no-untyped-def]
    inp = make_inputs(B, HQ, HKV, N, D, torch.float32)
    inp.store(path, chunk_tokens=512)
    return inp


def _check(inp, path: Path) -> None:  # type: ignore[no-untyped-def]
    g = zarr.open_group(str(path), mode="r")
    out, lse = torch.from_numpy(g["out"][...]), torch.from_numpy(g["lse"][...])
    check_exact(inp.q, inp.k, inp.v, out, lse, causal=True, scale=None, context=inp.ctx)


# ── tests ────────────────────────────────────────────────────────────────────────────────────


def test_job_over_tls_is_exact(tls_cluster, make_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dp, certs = tls_cluster
    inp = _store(make_inputs, tmp_path / "job.zarr")
    with Client(dp.address, security=certs.security(certs.client), timeout="10s") as c:
        assert c.scheduler.address.startswith("tls://")
        workers = c.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://") for a in workers), workers
        result = cqsa_dask.run(tmp_path / "job.zarr", client=c, causal=True, memory_budget=BUDGET)
    assert result.plan.groups > 1 and result.quorum_tasks_run > 1 and result.merges_run > 0
    _check(inp, tmp_path / "job.zarr")


def test_cli_takes_tls_from_dask_config(tls_cluster, make_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`cqsa run --scheduler tls://...` gets its certificates from dask config (here its environment)."""
    dp, certs = tls_cluster
    inp = _store(make_inputs, tmp_path / "cli.zarr")
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs.ca),
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs.client.cert),
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs.client.key),
           "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    proc = subprocess.run(["cqsa", "run", str(tmp_path / "cli.zarr"), "--scheduler", dp.address, "--causal",
                           "--budget", BUDGET, "--json"], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(inp, tmp_path / "cli.zarr")


@pytest.mark.parametrize("who", ["rogue certificate", "no certificate"])
def test_client_without_the_certificate_is_refused(tls_cluster, who) -> None:  # type: ignore[no-untyped-def]
    dp, certs = tls_cluster
    security = certs.security(certs.rogue) if who == "rogue certificate" else Security()
    t0 = time.monotonic()
    with pytest.raises((OSError, TimeoutError, TypeError)) as info:
        Client(dp.address, security=security, timeout="5s")
    assert time.monotonic() - t0 < 20, f"refusal took {time.monotonic() - t0:.1f} s"
    assert str(info.value), info.value
    # the cluster still serves the right client afterwards
    with Client(dp.address, security=certs.security(certs.client), timeout="10s") as c:
        assert c.scheduler_info()["workers"]


def test_cli_without_the_certificate_fails_in_one_line(tls_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dp, _ = tls_cluster
    from cqsa_dask.store.random_inputs import write_random_inputs

    write_random_inputs(tmp_path / "x.zarr", seq_len=256, heads=1, head_dim=16, chunk_tokens=256)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}
    t0 = time.monotonic()
    proc = subprocess.run(["cqsa", "run", str(tmp_path / "x.zarr"), "--scheduler", dp.address],
                          check=False, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and dp.address in lines[0], proc.stderr[-3000:]
    assert time.monotonic() - t0 < 30
    assert "out" not in zarr.open_group(str(tmp_path / "x.zarr"), mode="r")
