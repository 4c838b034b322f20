"""Listeners (Unix socket, TLS), the connection limits and graceful shutdown.

The Unix socket and the TLS listener each have their own budget of
``limits.max_connections``: TCP peers, who may not even be authenticated,
can never lock the local administrator out. A TLS client still in its
handshake also holds one of ``limits.max_tls_handshakes`` places, for at most
``limits.handshake_timeout_s``.

``serve`` binds its listeners, reports them through ``task_status`` and then
accepts until its :class:`ServerInfo`'s ``shutdown`` event is set (by a signal
or by the caller). Shutdown stops accepting, lets requests in flight finish
for up to ``limits.drain_timeout_s``, then cancels what is left and returns.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

import trio

from .auth import Principal, principal_for_cert, principal_for_unix, unix_peer
from .busypoll import BusyPoller
from .config import Config, TLSConfig
from .connection import Connection, GroupHandler, Handler
from .gather import Gatherer
from .logs import failure
from .readhub import ReadHub

__all__ = ["ServerInfo", "serve", "server_ssl_context"]

log = logging.getLogger("keybroker.server")

# Accept failing for lack of descriptors or memory is overload, not a bug:
# log, back off and retry, as trio.serve_listeners does.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF_S: Final = 0.100
# Kernel accept queue; a burst of clients should not see ECONNREFUSED.
_BACKLOG: Final = 1024


_StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass(eq=False)
class ServerInfo:
    """What a started server reports, and its shutdown switch.

    Attributes:
        socket_path: the Unix socket listening.
        tls_port: the bound TLS port (the config may say 0), or None.
        shutdown: set it to begin a graceful drain; ``serve`` returns after.
        poller: the busy poller (``[limits] busy_poll_us``), None when off.
        gatherer: runs requests of several connections as one group; None
            for a handler without groupable methods.
        hub: watches the Unix-socket connections' sockets while their
            readers wait (:mod:`broker.readhub`).
    """

    socket_path: Path
    tls_port: int | None = None
    poller: BusyPoller | None = None
    gatherer: Gatherer | None = None
    hub: ReadHub | None = None
    shutdown: trio.Event = field(default_factory=trio.Event)
    _done: trio.Event = field(default_factory=trio.Event, repr=False)

    async def drain(self) -> None:
        """Begin a graceful shutdown and wait until ``serve`` has finished it.

        Cancellation: the drain continues; only the wait is abandoned.
        """
        self.shutdown.set()
        await self._done.wait()


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate.

    Raises:
        OSError / ssl.SSLError: a certificate, key or CA file is unreadable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    ctx.load_verify_locations(cafile=str(tls.client_ca_file))
    return ctx


def _bind_unix(path: Path, mode: int) -> tuple[trio.socket.SocketType, int]:
    """Bind and listen on ``path`` with ``mode``; returns the socket and inode.

    The socket is bound under a temporary name, chmod-ed, then renamed into
    place, so no client can connect while its permissions are still the
    umask's.

    Raises:
        OSError: another process listens on ``path`` (EADDRINUSE), ``path``
            exists and is not a socket (EEXIST), or the directory is missing.
    """
    _remove_stale_socket(path)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.parent / f".kb-{os.getpid()}-{id(raw):x}.sock"
    try:
        raw.bind(str(tmp))
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        raw.listen(_BACKLOG)
        inode = os.stat(path).st_ino
        sock = trio.socket.from_stdlib_socket(raw)
    except BaseException:
        raw.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock, inode


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another broker is listening", str(path))


def _unlink_if_ours(path: Path, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


@dataclass(eq=False)
class _Budget:
    """How many connections of one kind may be open at once, and how many are."""

    what: str  # for the log line of a refusal
    limit: int
    active: int = 0

    def take(self) -> bool:
        """Count one more in, or log and return False when the budget is spent."""
        if self.active >= self.limit:
            log.warning("%s limit (%d) reached; refusing a client", self.what, self.limit)
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


@dataclass(eq=False)
class _Server:
    config: Config
    handler: Handler
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False
    unix_budget: _Budget = field(init=False)
    tls_budget: _Budget = field(init=False)
    handshakes: _Budget = field(init=False)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    poller: BusyPoller | None = None
    gatherer: Gatherer | None = None
    hub: ReadHub = field(default_factory=ReadHub)

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.unix_budget = _Budget("Unix socket connection", limits.max_connections)
        # One budget for every TCP listener (IPv4 and IPv6 may be two).
        self.tls_budget = _Budget("TLS connection", limits.max_connections)
        self.handshakes = _Budget("TLS handshake", limits.max_tls_handshakes)

    async def accept_loop(
        self,
        listener: trio.SocketListener,
        nursery: trio.Nursery,
        handle: _StreamHandler,
        budget: _Budget,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in %.0f ms", errno.errorcode[exc.errno], 100)
                await trio.sleep(_ACCEPT_BACKOFF_S)
                continue
            # Counted from accept, so clients stuck in a TLS handshake count too.
            if not budget.take():
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(self._counted, handle, stream, budget)

    async def _counted(self, handle: _StreamHandler, stream: trio.SocketStream, budget: _Budget) -> None:
        """Run ``handle`` on ``stream``; nothing it raises but cancellation leaves here.

        This task runs in the connections nursery, so an exception escaping
        it would cancel every other connection and stop ``serve``: one client
        must never be able to do that, whatever bug it finds.
        """
        try:
            await handle(stream)
        except Exception as exc:
            log.error("connection task failed: %s", failure(exc))
            await trio.aclose_forcefully(stream)
        finally:
            budget.release()

    async def handle_unix(self, stream: trio.SocketStream) -> None:
        try:
            uid, gid, pid = unix_peer(stream.socket)
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        await self.run_connection(stream, principal_for_unix(uid, gid, pid, self.config.principals))

    async def handle_tls(self, stream: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        tls_stream = trio.SSLStream(stream, ctx, server_side=True)
        principal: Principal | None = None
        # Taken here, not at accept: the task starts without a checkpoint, so
        # the count is as exact, and accepting stays one budget per listener.
        if self.handshakes.take():
            try:
                principal = await self._handshake(tls_stream)
            finally:
                self.handshakes.release()
        if principal is None:
            await trio.aclose_forcefully(tls_stream)
            return
        await self.run_connection(tls_stream, principal)

    async def _handshake(self, tls_stream: trio.SSLStream[trio.SocketStream]) -> Principal | None:
        """The verified peer's principal, or None if it did not prove one in time."""
        principal: Principal | None = None
        with trio.move_on_after(self.config.limits.handshake_timeout_s):
            try:
                await tls_stream.do_handshake()
                der = tls_stream.getpeercert(binary_form=True)
                if der:
                    principal = principal_for_cert(der, self.config.principals)
            except Exception as exc:
                # Whatever the peer's bytes or certificate make the TLS or
                # X.509 code raise refuses this client only: cryptography
                # raises plain Exception subclasses for some certificates
                # (an EDIPartyName SAN, a duplicate extension). The type
                # only: the message may quote the certificate.
                log.info("TLS client refused: %s", type(exc).__name__)
        return principal

    async def run_connection(self, stream: trio.abc.Stream, principal: Principal) -> None:
        conn = Connection(
            stream,
            principal=principal,
            connection_id=next(self.ids),
            handler=self.handler,
            limits=self.config.limits,
            poller=self.poller,
            gatherer=self.gatherer,
            hub=self.hub,
        )
        self.connections.add(conn)
        if self.draining:
            conn.begin_drain()
        try:
            await conn.run()
        except Exception as exc:
            # A bug in one connection must not take the server down.
            log.error("connection %d failed: %s", conn.connection_id, failure(exc))
        finally:
            self.connections.discard(conn)

    def begin_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.begin_drain()


def _close_listeners(listeners: list[tuple[trio.SocketListener, _StreamHandler, _Budget]]) -> None:
    for listener, _, _ in listeners:
        listener.socket.close()


async def _shutdown_on_signals(info: ServerInfo, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s; draining", signal.Signals(signum).name)
            info.shutdown.set()
            return


async def serve(
    config: Config,
    handler: Handler,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve msgpack-rpc on the configured listeners until shut down.

    Args:
        config: socket path and mode, optional TLS listener, limits,
            principal names.
        handler: the service that answers requests.
        handle_signals: let SIGTERM / SIGINT start a graceful drain (main
            thread only).
        task_status: receives a :class:`ServerInfo` once every listener is
            bound and accepting.

    Returns:
        After ``ServerInfo.shutdown`` is set and the drain has finished (in
        flight requests answered, or ``limits.drain_timeout_s`` passed).

    Raises:
        OSError: a listener cannot be bound (the Unix socket path is in use
            by a live broker or is not a socket; the TLS port is taken).
        ssl.SSLError: the TLS files do not load.

    Cancellation: stops at once; connections are closed, requests cancelled
    and the socket file removed.
    """
    sock, inode = _bind_unix(config.socket_path, config.socket_mode)
    try:
        listeners: list[tuple[trio.SocketListener, _StreamHandler, _Budget]] = []
        busy_poll_us = config.limits.busy_poll_us
        server = _Server(
            config,
            handler,
            poller=BusyPoller(busy_poll_us / 1e6) if busy_poll_us else None,
            gatherer=(
                Gatherer(cast("GroupHandler", handler), poll_s=config.limits.gather_poll_us / 1e6)
                if getattr(handler, "groupable", None)
                else None
            ),
        )
        listeners.append((trio.SocketListener(sock), server.handle_unix, server.unix_budget))
        info = ServerInfo(
            socket_path=config.socket_path, poller=server.poller, gatherer=server.gatherer, hub=server.hub
        )
        if config.tls is not None:
            ctx = server_ssl_context(config.tls)
            tcp = await trio.open_tcp_listeners(config.tls.port, host=config.tls.host, backlog=_BACKLOG)
            info.tls_port = tcp[0].socket.getsockname()[1]

            async def handle_tls(stream: trio.SocketStream) -> None:
                await server.handle_tls(stream, ctx)

            listeners.extend((listener, handle_tls, server.tls_budget) for listener in tcp)
        try:
            async with trio.open_nursery() as services:
                services.start_soon(server.hub.run)
                if server.gatherer is not None:
                    services.start_soon(server.gatherer.run)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as acceptors:
                        if handle_signals:
                            await acceptors.start(_shutdown_on_signals, info)
                        for listener, handle, budget in listeners:
                            acceptors.start_soon(server.accept_loop, listener, connections, handle, budget)
                        task_status.started(info)
                        await info.shutdown.wait()
                        acceptors.cancel_scope.cancel()
                    _close_listeners(listeners)
                    _unlink_if_ours(config.socket_path, inode)
                    server.begin_drain()
                    # Connections finish on their own; past the deadline, cancel.
                    connections.cancel_scope.deadline = trio.current_time() + config.limits.drain_timeout_s
                # Every connection is done: nothing more for the gatherer or the hub.
                services.cancel_scope.cancel()
        finally:
            # No awaits here: under cancellation they would raise at once and
            # skip the rest of the cleanup.
            _close_listeners(listeners)
            server.hub.close()
            info._done.set()
    finally:
        sock.close()
        _unlink_if_ours(config.socket_path, inode)
