"""Broker TLS against a real TLS-only ``redis-server`` with a CA made in the test: the engine
verifies the certificate by default, runs a saga over TLS with the right CA, and refuses to
start (exit 2, what to do) when the server's certificate is signed by another CA."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from saga.client import SagaClient
from saga.settings import Settings
from tests import sagas
from tests.processes import ROOT, ProcessGroup, wait_until


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> Path:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.crt"


def make_server_cert(folder: Path, ca: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, signed by the CA ``ca``."""
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt", cwd=folder,
    )  # fmt: skip
    return folder / "server.crt", folder / "server.key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_redis(tmp_path: Path, procs: ProcessGroup) -> Iterator[tuple[int, Path, Path]]:
    """A redis-server on a TLS port only; (port, its CA, another CA)."""
    server = shutil.which("redis-server")
    if server is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and the openssl command")
    certs = tmp_path / "certs"
    certs.mkdir()
    right, other = make_ca(certs, "right-ca"), make_ca(certs, "other-ca")
    cert, key = make_server_cert(certs, "right-ca")
    port = free_port()
    argv = [server, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)]
    argv += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(right)]
    argv += ["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"]
    redis_server = procs.command("redis-tls", argv, {})
    wait_until(lambda: _listening(port) or not redis_server.alive(), 20, "redis over TLS")
    if not redis_server.alive():
        log = redis_server.log()
        # A build without TLS does not know the directive ("Bad directive ... tls-port").
        if "tls-port" in log and "Bad directive" in log:
            pytest.skip(f"this redis-server was built without TLS: {log[-300:]}")
        raise AssertionError(f"redis-server with TLS did not start: {log[-1000:]}")
    yield port, right, other


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tls_settings(settings: Settings, port: int, ca: Path | None) -> Settings:
    return settings.model_copy(
        update={"broker_url": f"rediss://127.0.0.1:{port}/0", "broker_ca_file": ca}
    )


def test_a_saga_runs_over_tls_with_the_right_ca(
    settings: Settings, procs: ProcessGroup, tls_redis: tuple[int, Path, Path]
) -> None:
    port, right, _ = tls_redis
    tls = _tls_settings(settings, port, right)
    procs.relay(tls)
    procs.worker(tls, "tls")
    with SagaClient(tls) as client:
        run_id = client.start(sagas.ten, {"n": 1})
        assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))


@pytest.mark.parametrize("ca", ["other", "none"])
def test_a_certificate_from_another_ca_is_refused(
    settings: Settings, tls_redis: tuple[int, Path, Path], ca: str
) -> None:
    """Another CA, or none (a bare rediss://: the system's CAs, which do not know this one):
    the worker does not start, and says what to do."""
    port, _, other = tls_redis
    tls = _tls_settings(settings, port, other if ca == "other" else None)
    done = subprocess.run(
        [sys.executable, "-m", "saga", "worker", "--pool", "solo"],
        env=tls.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "TLS certificate this client does not trust" in done.stderr
    assert "SAGA_BROKER_CA_FILE" in done.stderr
