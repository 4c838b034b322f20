"""Audit sink that forwards every audit record to syslog (RFC 5424).

Configuration (``[plugins.syslog]``; without the section there is no sink)::

    [plugins.syslog]
    transport = "tcp"              # unix (default) | udp | tcp
    address = "logs.example:514"   # udp/tcp: host:port ([v6]:port); default 127.0.0.1:514
    path = "/dev/log"              # unix: the socket (datagram, or stream with framing)
    app_name = "keybroker"
    facility = "authpriv"          # a name (auth, daemon, local0 ...) or 0-23
    hostname = "kb-1"              # default: each record's node name
    enterprise_id = 32473          # SD-ID keybroker@<enterprise_id>
    send_timeout_s = 5.0           # a send taking longer counts as failed
    reconnect_max_s = 30.0         # back-off ceiling between reconnection attempts

The sink is *non-primary*: the local hash-chained file (the ``auditlog``
plugin) stays the record of truth and a request is answered once its record
is durable there; syslog receives the same records afterwards, from a
background task of the audit log (:func:`broker.audit.open_audit_log`). So
a slow, stopped or unreachable receiver never delays or loses a local
record. While it is away, records wait in the audit log's bounded per-sink
queue (``FANOUT_QUEUE_LIMIT``); past that bound, and for every batch the
sink fails to send, records are dropped *for syslog only* and counted
(``AuditLog.sink_gaps["syslog"]``, with a log line naming the seq range).
Once the receiver is back, the first message it gets is a gap notice
(MSGID ``audit.gap``, SD-ID ``keybroker-gap@...``) saying how many records
were not forwarded and their seq ranges, so the remote side knows exactly
what to fetch from the local log.

TCP uses octet-counting framing (RFC 6587 §3.4.1); UDP and Unix datagram
sockets carry one message per datagram.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from broker.audit import AuditRecord
from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl

from ._format import FACILITIES, GapTracker, Header, format_gap, format_record, octet_counted

__all__ = ["SINK_NAME", "SyslogConfig", "SyslogSink", "kb_audit_sinks"]

SINK_NAME: Final = "syslog"
log = logging.getLogger("keybroker.syslog")

DEFAULT_PORT: Final = 514
# The first retry after a failure comes this soon; each further failure
# doubles the wait up to reconnect_max_s, so a dead receiver costs one
# connection attempt per interval, not one per batch.
FIRST_RETRY_S: Final = 0.5
TRANSPORTS: Final = ("unix", "udp", "tcp")
_OPTIONS: Final = frozenset(
    {"transport", "address", "path", "app_name", "facility", "hostname", "enterprise_id", "send_timeout_s",
     "reconnect_max_s"}
)


@dataclass(frozen=True, slots=True)
class SyslogConfig:
    transport: str = "unix"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: Path = Path("/dev/log")
    app_name: str = "keybroker"
    facility: int = FACILITIES["authpriv"]
    hostname: str | None = None
    enterprise_id: int = 32473
    send_timeout_s: float = 5.0
    reconnect_max_s: float = 30.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SyslogConfig:
        """Parse ``[plugins.syslog]``.

        Raises:
            InvalidArgument: an unknown option or a bad value (naming it).
        """
        check_options(table, _OPTIONS, "[plugins.syslog]")
        transport = table.get("transport", "unix")
        if transport not in TRANSPORTS:
            raise InvalidArgument("config: plugins.syslog.transport must be unix, udp or tcp")
        host, port = _address(table.get("address", f"127.0.0.1:{DEFAULT_PORT}"))
        facility = table.get("facility", "authpriv")
        if isinstance(facility, str) and facility in FACILITIES:
            facility = FACILITIES[facility]
        if isinstance(facility, bool) or not isinstance(facility, int) or not 0 <= facility <= 23:
            raise InvalidArgument("config: plugins.syslog.facility must be a facility name or 0-23")
        enterprise_id = table.get("enterprise_id", 32473)
        if isinstance(enterprise_id, bool) or not isinstance(enterprise_id, int) or enterprise_id < 1:
            raise InvalidArgument("config: plugins.syslog.enterprise_id must be a positive integer")
        timings: dict[str, float] = {}
        for option, default in (("send_timeout_s", 5.0), ("reconnect_max_s", 30.0)):
            value = table.get(option, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidArgument(f"config: plugins.syslog.{option} must be a positive number")
            timings[option] = float(value)
        texts: dict[str, str | None] = {}
        for option in ("path", "app_name", "hostname"):
            value = table.get(option)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgument(f"config: plugins.syslog.{option} must be a non-empty string")
            texts[option] = value
        return cls(
            transport=transport,
            host=host,
            port=port,
            path=Path(texts["path"] or "/dev/log"),
            app_name=texts["app_name"] or "keybroker",
            facility=facility,
            hostname=texts["hostname"],
            enterprise_id=enterprise_id,
            **timings,
        )


def _address(value: object) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 514)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument("config: plugins.syslog.address must be host:port")
    host, sep, port_text = value.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port_text = value, str(DEFAULT_PORT)  # bare host or bare IPv6 address
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidArgument("config: plugins.syslog.address must be host:port") from None
    if not host or not 0 < port < 65536:
        raise InvalidArgument("config: plugins.syslog.address must be host:port with a port of 1-65535")
    return host, port


@hookimpl
def kb_audit_sinks(config: Config) -> list[SyslogSink]:
    """A syslog sink when ``[plugins.syslog]`` is present, else none."""
    if SINK_NAME not in config.plugins:
        return []
    return [SyslogSink(SyslogConfig.from_table(config.section(SINK_NAME)))]


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


class SyslogSink:
    """Non-primary audit sink forwarding records to a syslog receiver.

    The audit log calls :meth:`write` from one background task, one batch at
    a time. A batch that cannot be sent is dropped for syslog, remembered
    for the gap notice, and reported by raising ``OSError`` (the audit log
    counts it in ``sink_gaps`` and logs its seq range); the local record is
    never affected.

    Resource handling: one connection (or datagram socket), opened lazily,
    re-opened after a failure with exponential back-off; :meth:`aclose`
    closes it and is idempotent.
    """

    primary = False

    def __init__(self, config: SyslogConfig) -> None:
        self.name = SINK_NAME
        self.config = config
        self.header = Header(
            facility=config.facility,
            app_name=config.app_name,
            procid=str(os.getpid()),
            enterprise_id=config.enterprise_id,
            hostname=config.hostname,
        )
        self.gaps = GapTracker()
        self._sock: trio.socket.SocketType | None = None
        self._stream = False  # True: octet-counted frames on a stream socket
        self._retry_at = 0.0
        self._backoff = min(FIRST_RETRY_S, config.reconnect_max_s)
        self._last_node: str | None = None

    @property
    def target(self) -> str:
        if self.config.transport == "unix":
            return str(self.config.path)
        return f"{self.config.transport}://{self.config.host}:{self.config.port}"

    async def open(self) -> None:
        """Try to connect now, so a misconfiguration shows in the log at start-up.

        Never raises: a receiver that is not there yet is reconnected to later.
        """
        try:
            await self._connect()
        except OSError as exc:
            self._failed()
            log.warning("syslog receiver %s unreachable at start-up (%s); will retry", self.target, exc)

    async def write(self, records: Sequence[AuditRecord]) -> None:
        """Send ``records`` (after any pending gap notice).

        Raises:
            OSError: the batch could not be sent (it is counted as a gap).
        """
        if not records:
            return
        self.gaps.seen(records)
        self._last_node = records[-1].node
        messages = [format_record(r, self.header) for r in records]
        notice = self.gaps.missed > 0
        if notice:
            messages.insert(0, format_gap(self.gaps, self.header, _utc_now(), self._last_node))
        try:
            if self._sock is None or self._peer_closed():
                self._close()
                await trio.sleep_until(self._retry_at)
                await self._connect()
            with trio.fail_after(self.config.send_timeout_s):
                await self._send(messages)
        except (OSError, trio.TooSlowError) as exc:
            # Half a frame may be on the wire: the connection cannot be reused.
            self._close()
            self._failed()
            self.gaps.lost(records)
            reason = str(exc) or type(exc).__name__
            raise OSError(errno.EIO, f"syslog receiver {self.target}: {reason}") from exc
        if notice:
            log.warning("syslog receiver %s told of %d audit records not forwarded", self.target,
                        self.gaps.missed)
            self.gaps.clear()
        self._backoff = min(FIRST_RETRY_S, self.config.reconnect_max_s)

    async def aclose(self) -> None:
        """Close the connection. Idempotent."""
        self._close()

    # --- connection handling ---------------------------------------------------

    def _failed(self) -> None:
        self._retry_at = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, self.config.reconnect_max_s)

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _peer_closed(self) -> bool:
        """True when a stream receiver has hung up (or reset) the connection.

        A syslog receiver never talks back, so a readable stream socket
        means EOF or an error; sending on it would go into a dead buffer and
        be lost without a trace. Datagram sockets report their errors on send.
        """
        if self._sock is None or not self._stream:
            return False
        readable, _, _ = select.select([self._sock.fileno()], [], [], 0)
        return bool(readable)

    async def _connect(self) -> None:
        config = self.config
        if config.transport == "unix":
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                await sock.connect(str(config.path))
                self._stream = False
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EPROTOTYPE:
                    raise
                # A stream socket (some syslog daemons listen so): frame messages.
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await sock.connect(str(config.path))
                except BaseException:
                    sock.close()
                    raise
                self._stream = True
        else:
            kind = socket.SOCK_STREAM if config.transport == "tcp" else socket.SOCK_DGRAM
            infos = await trio.socket.getaddrinfo(config.host, config.port, type=kind)
            if not infos:
                raise OSError(errno.EHOSTUNREACH, f"no address for {config.host}")
            family, socktype, proto, _, address = infos[0]
            sock = trio.socket.socket(family, socktype, proto)
            try:
                with trio.fail_after(config.send_timeout_s):
                    await sock.connect(address)
            except trio.TooSlowError:
                sock.close()
                raise OSError(errno.ETIMEDOUT, "connect timed out") from None
            except BaseException:
                sock.close()
                raise
            self._stream = kind == socket.SOCK_STREAM
        self._sock = sock

    async def _send(self, messages: Sequence[bytes]) -> None:
        sock = self._sock
        assert sock is not None
        if self._stream:
            data = memoryview(b"".join(octet_counted(m) for m in messages))
            while data:
                sent = await sock.send(data)
                data = data[sent:]
        else:
            for message in messages:
                await sock.send(message)
