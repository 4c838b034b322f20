"""A PyKMIP server on loopback and its clients, for ``python -m bench peers``.

:func:`kmip_server` generates a CA, a server and a client certificate
(``trustme``), runs ``kmip.services.server.KmipServer`` in a subprocess
(``python -m bench.peers_kmip serve SETTINGS_JSON``) with TLS 1.2 and client
authentication, its default SQLite database in the temporary directory, and
yields an :class:`Endpoint`. :func:`client` opens a
``kmip.pie.client.ProxyKmipClient`` on it.

:class:`Workers` keeps N client processes (PyKMIP's client is pure Python, so
threads would share one GIL) and runs timed windows of ``create`` or
``encrypt`` in all of them at once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Endpoint:
    """Where the PyKMIP server listens and the client's credentials."""

    host: str
    port: int
    ca: str
    cert: str
    key: str


def _quiet() -> None:
    """PyKMIP imports deprecated ciphers and SQLAlchemy warns about its types: not our figures."""
    warnings.filterwarnings("ignore")
    logging.getLogger("kmip").setLevel(logging.CRITICAL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def kmip_server() -> Iterator[Endpoint]:
    """A PyKMIP server in a subprocess on 127.0.0.1 with fresh certificates and database."""
    import trustme  # noqa: PLC0415 -- installed by the bench itself

    directory = Path(tempfile.mkdtemp(prefix="kb-peers-kmip-", dir="/tmp"))
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost", common_name="kmip-server")
    client_cert = ca.issue_cert("bench-client", common_name="bench-client")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server_cert.private_key_pem.write_to_path(str(directory / "server.key"))
    client_cert.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(directory / "client.key"))
    endpoint = Endpoint(
        "127.0.0.1",
        _free_port(),
        str(directory / "ca.pem"),
        str(directory / "client.pem"),
        str(directory / "client.key"),
    )
    settings = {
        "hostname": endpoint.host,
        "port": endpoint.port,
        "certificate_path": str(directory / "server.pem"),
        "key_path": str(directory / "server.key"),
        "ca_path": endpoint.ca,
        "auth_suite": "TLS1.2",
        "config_path": None,
        "log_path": str(directory / "server.log"),
        "enable_tls_client_auth": True,
        "logging_level": "WARNING",
        "database_path": str(directory / "pykmip.db"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.peers_kmip", "serve", json.dumps(settings)],
        cwd=_REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_serving(proc, endpoint)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_serving(proc: subprocess.Popen[bytes], endpoint: Endpoint) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"PyKMIP server exited with {proc.returncode}")
        try:
            with client(endpoint) as kmip:
                kmip.create(*aes256())
            return
        except Exception:  # not up yet: any failure means "retry"
            time.sleep(0.2)
    raise RuntimeError("PyKMIP server did not start")


def aes256() -> tuple[Any, int]:
    """``(algorithm, length)`` arguments of ``ProxyKmipClient.create`` for an AES-256 key."""
    from kmip import enums  # noqa: PLC0415

    return enums.CryptographicAlgorithm.AES, 256


def gcm_parameters() -> dict[str, Any]:
    """AES-GCM with a server-generated IV and a 16-byte tag."""
    from kmip import enums  # noqa: PLC0415

    return {
        "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
        "block_cipher_mode": enums.BlockCipherMode.GCM,
        "tag_length": 16,
        "random_iv": True,
    }


def client(endpoint: Endpoint) -> Any:
    """A ``ProxyKmipClient`` for the endpoint (use as a context manager)."""
    _quiet()
    from kmip.pie.client import ProxyKmipClient  # noqa: PLC0415

    return ProxyKmipClient(
        hostname=endpoint.host,
        port=endpoint.port,
        cert=endpoint.cert,
        key=endpoint.key,
        ca=endpoint.ca,
        config_file="/dev/null",  # no ~/.pykmip/pykmip.conf lookups
    )


def active_key(kmip: Any) -> str:
    """Create and activate an AES-256 key; its uid."""
    uid: str = kmip.create(*aes256())
    kmip.activate(uid)
    return uid


# --- concurrent clients in processes -----------------------------------------------


def _window(endpoint: dict[str, Any], op: str, uid: str, start_at: float, end_at: float) -> int:
    """In a worker: connect, warm up, then count ``op`` calls between two wall-clock times."""
    point = Endpoint(**endpoint)
    params = gcm_parameters()
    data = bytes(32)
    with client(point) as kmip:
        if op == "create":

            def call() -> object:
                return kmip.create(*aes256())
        else:

            def call() -> object:
                return kmip.encrypt(data, uid=uid, cryptographic_parameters=params)

        call()
        while time.time() < start_at:
            time.sleep(0.001)
        done = 0
        while time.time() < end_at:
            call()
            done += 1
    return done


class Workers:
    """``n`` PyKMIP client processes that run timed windows together."""

    def __init__(self, endpoint: Endpoint, n: int) -> None:
        self._endpoint = asdict(endpoint)
        self._n = n
        self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        # Start every process (spawn imports the module afresh) before timing anything.
        list(self._pool.map(_warm, range(n)))

    def rate(self, op: str, uid: str, seconds: float) -> float:
        """Operations per second of all workers calling ``op`` for ``seconds`` at once."""
        start_at = time.time() + 1.0  # time to connect and warm up
        end_at = start_at + seconds
        futures = [
            self._pool.submit(_window, self._endpoint, op, uid, start_at, end_at) for _ in range(self._n)
        ]
        return sum(f.result() for f in futures) / seconds

    def close(self) -> None:
        self._pool.shutdown()


def _warm(_: int) -> int:
    _quiet()
    import kmip.pie.client  # noqa: F401, PLC0415

    return os.getpid()


def _serve(settings: dict[str, Any]) -> None:
    _quiet()
    from kmip.services.server import KmipServer  # noqa: PLC0415

    server = KmipServer(**settings)
    with server:
        server.serve()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m bench.peers_kmip serve SETTINGS_JSON")
