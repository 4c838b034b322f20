"""Wire baselines: a bare trio msgpack-rpc echo server and a request-rate meter.

Helpers for ``python -m bench wire`` (this module has no ``run``):

* :func:`serve_echo` -- the floor any trio msgpack-rpc server stands on: read,
  unpack, pack ``[1, msgid, nil, params]``, write; nothing else.
* :func:`serve_transport_echo` -- keybroker's own transport (limits, in-flight
  bound, coalescing writer) around a handler that echoes: the transport's
  ceiling, without service, policy, audit or crypto.
* :func:`measure_rpc` -- requests per second against any msgpack-rpc Unix
  socket, sequential (``pipeline=1``) or in bursts of ``pipeline`` requests
  sent back to back on one connection.
* :func:`measure_echo` -- runs an echo server in a subprocess (its own core)
  and returns the sequential and pipelined rates.

The meter is a plain blocking-socket client, so it costs the measuring
process little and the same meter is used against every server.

``python -m bench.wire_echo serve {echo,transport} PATH`` runs a server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import trio

from bench import median

RECEIVE_SIZE = 256 * 1024
_REPO = Path(__file__).resolve().parent.parent


async def _echo_connection(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    packer = msgpack.Packer(use_bin_type=True)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            unpacker.feed(data)
            out = [packer.pack([1, msg[1], None, msg[3][0]]) for msg in unpacker]
            if out:
                try:
                    await stream.send_all(b"".join(out))
                except trio.BrokenResourceError:
                    return


async def serve_echo(socket_path: str | Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A bare msgpack-rpc echo server on a Unix socket; runs until cancelled.

    Answers every ``[0, msgid, method, [params]]`` with ``[1, msgid, nil, params]``,
    all replies to one read in one write.
    """
    path = str(socket_path)
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    await trio.serve_listeners(_echo_connection, [listener], task_status=task_status)


class _Echo:
    async def handle(self, ctx: Any, method: str, params: dict[str, Any]) -> Any:
        return params

    def connection_closed(self, ctx: Any) -> None:
        pass


async def serve_transport_echo(
    socket_path: str | Path, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """keybroker's transport (``broker.server.serve``) with an echoing handler."""
    from broker.config import Config  # noqa: PLC0415 -- keep the bare server free of broker imports
    from broker.server import serve  # noqa: PLC0415

    path = Path(socket_path)
    config = Config(data_dir=path.parent, socket_path=path)
    await serve(config, _Echo(), task_status=task_status)


def measure_rpc(
    socket_path: str | Path,
    method: str = "echo",
    params: dict[str, Any] | None = None,
    *,
    pipeline: int = 1,
    duration_s: float = 2.0,
    warmup_s: float = 0.3,
) -> float:
    """Requests per second on one connection.

    Args:
        socket_path: any msgpack-rpc server's Unix socket.
        method, params: the request sent over and over (e.g. ``encrypt`` of
            64 bytes against the broker).
        pipeline: 1 for request-reply; N sends N requests back to back and
            waits for all N replies before the next burst.
        duration_s, warmup_s: measuring time, after a warm-up.

    Returns:
        Completed requests per second (replies must not be errors).

    Raises:
        RuntimeError: the server answered with an error.
    """
    packer = msgpack.Packer(use_bin_type=True)
    burst = b"".join(packer.pack([0, i, method, [params or {}]]) for i in range(pipeline))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        unpacker = msgpack.Unpacker(raw=False)

        def one_burst() -> None:
            sock.sendall(burst)
            pending = pipeline
            while pending:
                data = sock.recv(RECEIVE_SIZE)
                if not data:
                    raise RuntimeError("server closed the connection")
                unpacker.feed(data)
                for reply in unpacker:
                    if reply[2] is not None:
                        raise RuntimeError(f"server error: {reply[2]!r}")
                    pending -= 1

        end = time.perf_counter() + warmup_s
        while time.perf_counter() < end:
            one_burst()
        done = 0
        start = time.perf_counter()
        end = start + duration_s
        while (now := time.perf_counter()) < end:
            one_burst()
            done += pipeline
        return done / (now - start)


def start_server(kind: str, socket_path: str | Path, timeout_s: float = 20.0) -> subprocess.Popen[bytes]:
    """Run ``serve_echo`` (kind "echo") or ``serve_transport_echo`` ("transport")
    in a subprocess and wait until it accepts connections."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wire_echo", "serve", kind, str(socket_path)], cwd=_REPO, env=env
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(socket_path))
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def measure_echo(
    *, kind: str = "echo", pipeline: int = 100, duration_s: float = 2.0, repeats: int = 3
) -> dict[str, float]:
    """Sequential and pipelined req/s of an echo server in a subprocess.

    Args:
        kind: "echo" (bare trio server) or "transport" (keybroker's transport).
        pipeline: burst size for the pipelined figure.
        duration_s: per measurement; each is repeated ``repeats`` times and
            the median reported.

    Returns:
        ``{"sequential": req/s, "pipelined": req/s, "pipeline": N}``.
    """
    directory = tempfile.mkdtemp(prefix="kb-bench-", dir="/tmp")
    path = Path(directory) / "echo.sock"
    proc = start_server(kind, path)
    try:
        params = {"plaintext": b"x" * 64}
        seq = [measure_rpc(path, "echo", params, duration_s=duration_s) for _ in range(repeats)]
        pipe = [
            measure_rpc(path, "echo", params, pipeline=pipeline, duration_s=duration_s)
            for _ in range(repeats)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        path.unlink(missing_ok=True)
        os.rmdir(directory)
    return {"sequential": median(seq), "pipelined": median(pipe), "pipeline": float(pipeline)}


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve" and argv[1] in ("echo", "transport"):
        server = serve_echo if argv[1] == "echo" else serve_transport_echo
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(server, argv[2])
        return 0
    if not argv:
        for kind in ("echo", "transport"):
            print(kind, measure_echo(kind=kind, duration_s=1.5))
        return 0
    print("usage: python -m bench.wire_echo [serve {echo,transport} PATH]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
