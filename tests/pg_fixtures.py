"""A real PostgreSQL server for tests: one per session, a fresh database per test.

The server runs from the PostgreSQL binaries (``initdb``, ``pg_ctl``) in a
temporary directory, listening on 127.0.0.1 on a free port and on a Unix
socket in that directory, with trust authentication (it exists only for the
test run and only on loopback) and ``fsync=on``, so the durability under
test is the real one. PostgreSQL refuses to run as root, so under root the
server runs as the ``postgres`` system user (``runuser``), owning its
directory.

Import the fixtures into a test module::

    from tests import pg_fixtures
    pg_server = pg_fixtures.pg_server    # the session's server
    pg_dsn = pg_fixtures.pg_dsn          # a fresh database for this test

When the binaries, psycopg or the unprivileged user are missing, the tests
skip locally and fail in CI (``KEYBROKER_REQUIRE_ALL=1``) through conftest's
``require``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require

__all__ = ["PG_BIN", "PgServer", "pg_available", "pg_dsn", "pg_server", "start_server"]

_CANDIDATES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
if os.environ.get("KEYBROKER_PG_BIN"):
    _CANDIDATES.insert(0, Path(os.environ["KEYBROKER_PG_BIN"]))
#: The newest installed PostgreSQL's binaries, or None.
PG_BIN: Path | None = next(
    (p for p in _CANDIDATES if (p / "initdb").exists() and (p / "pg_ctl").exists()), None
)
# Under root, the server runs as this user.
RUN_AS = "postgres"
# Generous for a loaded CI machine; a healthy start takes well under a second.
START_TIMEOUT_S = 60


def _psycopg_importable() -> bool:
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _run_as_prefix() -> list[str] | None:
    """The command prefix that drops root, [] when not root, None when impossible."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return None
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    return None if runuser is None else [runuser, "-u", RUN_AS, "--"]


def pg_available() -> tuple[bool, str]:
    """Whether a test server can be started here, and what is missing if not."""
    if PG_BIN is None:
        return False, "PostgreSQL server binaries (initdb, pg_ctl)"
    if not _psycopg_importable():
        return False, "psycopg (the postgres extra)"
    if _run_as_prefix() is None:
        return False, f"an unprivileged '{RUN_AS}' user and runuser, to run PostgreSQL under root"
    return True, ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgServer:
    """A PostgreSQL server of the test run."""

    root: Path
    port: int
    prefix: list[str]
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> str:
        return str(self.root / "server.log")

    def dsn(self, dbname: str = "postgres") -> str:
        """A DSN over TCP loopback (the path where keepalives and timeouts apply)."""
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def ctl(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        """Run ``pg_ctl`` on this server as its owner."""
        assert PG_BIN is not None
        command = [*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)

    def start(self) -> None:
        # fsync=on is PostgreSQL's default; said here because durability is
        # what the tests check. Small shared_buffers: several engineers'
        # test servers share the machine.
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.root} "
            "-c fsync=on -c synchronous_commit=on -c shared_buffers=32MB -c max_connections=60"
        )
        self.ctl("-l", self.log, "-w", "-t", str(START_TIMEOUT_S), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every session ends; the server is back when this returns."""
        # -l again: without it the new server would write to pg_ctl's
        # output, a pipe that then never closes.
        self.ctl("-l", self.log, "-m", mode, "-w", "-t", str(START_TIMEOUT_S), "restart")

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser in the maintenance database (autocommit)."""
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # test-built statements

    def create_database(self) -> str:
        """A new, empty UTF8 database; its DSN."""
        name = f"kb_{uuid.uuid4().hex[:12]}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("dbname=", 1)[1]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_server(prefix: list[str]) -> PgServer:
    """initdb and start a server in a new temporary directory (owned by the server's user)."""
    assert PG_BIN is not None
    root = Path(tempfile.mkdtemp(prefix="kbpg-", dir="/tmp"))
    if prefix:
        entry = pwd.getpwnam(RUN_AS)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PgServer(root=root, port=_free_port(), prefix=prefix)
    try:
        # --no-sync only skips flushing the scratch cluster initdb writes;
        # the server itself runs with fsync on.
        subprocess.run(
            [*prefix, str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S,
        )
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def discard_server(server: PgServer) -> None:
    """Stop the server (immediately if a fast stop fails) and remove its directory."""
    try:
        server.stop("fast")
    except (subprocess.SubprocessError, OSError):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            server.stop("immediate")
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started on first use, stopped at the end)."""
    available, missing = pg_available()
    require(available, missing)
    prefix = _run_as_prefix()
    assert prefix is not None
    try:
        server = start_server(prefix)
    except (subprocess.SubprocessError, OSError) as exc:
        require(False, f"a PostgreSQL test server ({type(exc).__name__}: {exc})")
        raise
    try:
        yield server
    finally:
        discard_server(server)


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped after the test."""
    dsn = pg_server.create_database()
    try:
        yield dsn
    finally:
        pg_server.drop_database(dsn)
