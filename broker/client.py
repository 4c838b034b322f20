"""keybroker clients: a blocking :class:`Client` and a trio :class:`AsyncClient`.

Both have one method per protocol method (``key.create`` is
``key_create``) plus a generic :meth:`call`. Optional parameters left as
None are omitted from the request. Errors come back as the
:mod:`broker.errors` class of their wire code, with the broker's message and
details untouched.

Reconnection: a client reconnects once when its connection turns out to be
broken, but never silently resends a request that may already have changed
state:

* a request that was not (completely) sent -- the connection was found
  closed before sending, or sending failed -- is sent again on a new
  connection; the broker only acts on complete messages;
* a request whose reply was lost after it was sent is resent only if the
  method is a read (:data:`IDEMPOTENT_METHODS`); otherwise
  :class:`ConnectionLost` is raised, and the caller must find out whether it
  took effect (``key.get``, audit log).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import trio

from .errors import BrokerError, error_for_code
from .protocol import (
    MAX_MSGID,
    Notification,
    ProtocolError,
    Response,
    ResponseDecoder,
    encode_request,
    new_packer,
)
from .streamio import stream_io

__all__ = [
    "DEFAULT_BUSY_POLL_US",
    "IDEMPOTENT_METHODS",
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "client_ssl_context",
]

# Methods that change no state (decrypt and verify count no uses), so a
# request whose reply was lost may be sent again.
IDEMPOTENT_METHODS: Final = frozenset(
    {"ping", "whoami", "key.get", "key.list", "key.public"}
    | {"decrypt", "decrypt_batch", "verify", "verify_mac"}
)
# Replies can be larger than requests (a batch's ciphertexts grow per item).
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_RECEIVE_SIZE: Final = 256 * 1024
# Reads while busy polling land in a buffer kept for the client; a reply
# larger than this is read in several parts.
_POLL_READ_SIZE: Final = 64 * 1024
DEFAULT_TIMEOUT_S: Final = 60.0
# How long a blocking client reads for its reply before it sleeps (see Client).
DEFAULT_BUSY_POLL_US: Final = 100
# After a poll that found no reply, the client's next calls sleep at once:
# 1 call, then 2, 4... up to this many, until a poll finds its reply again.
_MAX_POLL_BACKOFF: Final = 64


class _PollSlot:
    """One thread per process polls at a time: a process whose many threads
    each wait for a reply would otherwise keep every core busy, the
    broker's among them."""

    lock = threading.Lock()

    @classmethod
    def renew(cls) -> None:
        """In a forked child: a lock its parent's threads held stays held, so start afresh."""
        cls.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_PollSlot.renew)

R = TypeVar("R")


class ConnectionLost(ConnectionError):
    """The connection broke after a state-changing request was sent.

    The broker may or may not have carried the request out.
    """


def client_ssl_context(
    ca_file: str | Path, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting ``ca_file`` and presenting a client cert.

    Raises:
        OSError / ssl.SSLError: a file is unreadable or invalid.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    return ctx


def _error_from_wire(error: Any) -> BrokerError:
    """The typed exception for a wire error map, message and details as sent."""
    if isinstance(error, dict):
        code, message, details = error.get("code"), error.get("message"), error.get("details")
    else:
        code, message, details = None, None, None
    code = code if isinstance(code, str) else "internal"
    cls = error_for_code(code)
    # Bypass subclass __init__s: Internal's would append a new correlation id
    # to the broker's message, which already carries the one in its log.
    exc = cls.__new__(cls)
    BrokerError.__init__(
        exc, message if isinstance(message, str) else code, details if isinstance(details, dict) else None
    )
    if cls is BrokerError:
        exc.code = code  # type: ignore[misc]  # an unknown code: keep it visible
    return exc


def _unwrap(response: Response) -> Any:
    if response.error is not None:
        raise _error_from_wire(response.error)
    return response.result


def _params(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class _NotSent(Exception):
    """The request never fully left: safe to send again."""


class _Lost(Exception):
    """The request was sent, the reply never came."""


class _Api(Generic[R]):
    """One method per protocol method; ``R`` is the result or an awaitable of it."""

    def call(self, method: str, params: dict[str, Any]) -> R:
        raise NotImplementedError

    def ping(self) -> R:
        """``{version, protocol, node}``."""
        return self.call("ping", {})

    def whoami(self) -> R:
        """``{principal, roles}``."""
        return self.call("whoami", {})

    def key_create(self, name: str, type: str, **opts: Any) -> R:
        """Create a key; ``opts`` are key.create's optional fields. Returns metadata."""
        return self.call("key.create", _params(name=name, type=type, **opts))

    def key_get(self, name: str) -> R:
        return self.call("key.get", {"name": name})

    def key_list(
        self,
        prefix: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> R:
        """``{keys: [metadata], cursor}``; pass the cursor back for the next page."""
        return self.call("key.list", _params(prefix=prefix, state=state, limit=limit, cursor=cursor))

    def key_rotate(self, name: str) -> R:
        return self.call("key.rotate", {"name": name})

    def key_update(
        self,
        name: str,
        *,
        rotation_period_s: int | None = None,
        max_uses_per_version: int | None = None,
        min_decrypt_version: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> R:
        return self.call(
            "key.update",
            _params(
                name=name,
                rotation_period_s=rotation_period_s,
                max_uses_per_version=max_uses_per_version,
                min_decrypt_version=min_decrypt_version,
                labels=labels,
            ),
        )

    def key_activate(self, name: str) -> R:
        return self.call("key.activate", {"name": name})

    def key_deactivate(self, name: str) -> R:
        return self.call("key.deactivate", {"name": name})

    def key_disable(self, name: str) -> R:
        return self.call("key.disable", {"name": name})

    def key_enable(self, name: str) -> R:
        return self.call("key.enable", {"name": name})

    def key_compromise(self, name: str, version: int | None = None) -> R:
        return self.call("key.compromise", _params(name=name, version=version))

    def key_schedule_destroy(self, name: str, pending_days: int | None = None) -> R:
        return self.call("key.schedule_destroy", _params(name=name, pending_days=pending_days))

    def key_cancel_destroy(self, name: str) -> R:
        return self.call("key.cancel_destroy", {"name": name})

    def key_public(self, name: str, version: int | None = None) -> R:
        """``{pem, version}``."""
        return self.call("key.public", _params(name=name, version=version))

    def encrypt(self, key: str, plaintext: bytes, aad: bytes | None = None) -> R:
        """``{ciphertext, version}``."""
        return self.call("encrypt", _params(key=key, plaintext=plaintext, aad=aad))

    def decrypt(
        self, ciphertext: bytes, aad: bytes | None = None, allow_compromised: bool | None = None
    ) -> R:
        """``{plaintext, key, version}``."""
        return self.call(
            "decrypt", _params(ciphertext=ciphertext, aad=aad, allow_compromised=allow_compromised)
        )

    def encrypt_batch(self, key: str, items: list[bytes], aad: bytes | list[bytes] | None = None) -> R:
        """``{ciphertexts, version}``."""
        return self.call("encrypt_batch", _params(key=key, items=items, aad=aad))

    def decrypt_batch(
        self,
        ciphertexts: list[bytes],
        aad: bytes | list[bytes] | None = None,
        allow_compromised: bool | None = None,
    ) -> R:
        """``{plaintexts, errors}``: per item, a plaintext or an error map."""
        return self.call(
            "decrypt_batch",
            _params(ciphertexts=ciphertexts, aad=aad, allow_compromised=allow_compromised),
        )

    def rewrap_batch(
        self,
        ciphertexts: list[bytes],
        aad: bytes | list[bytes] | None = None,
        allow_compromised: bool | None = None,
    ) -> R:
        """``{ciphertexts, errors}`` re-encrypted under each key's primary version."""
        return self.call(
            "rewrap_batch",
            _params(ciphertexts=ciphertexts, aad=aad, allow_compromised=allow_compromised),
        )

    def datakey(
        self,
        key: str,
        *,
        count: int | None = None,
        bytes: int | None = None,
        plaintext: bool | None = None,
        aad: builtins.bytes | None = None,
    ) -> R:
        """``{keys: [{plaintext?, wrapped}], version}``."""
        return self.call("datakey", _params(key=key, count=count, bytes=bytes, plaintext=plaintext, aad=aad))

    def sign(self, key: str, message: bytes | None = None, digest: bytes | None = None) -> R:
        """``{signature, version}``."""
        return self.call("sign", _params(key=key, message=message, digest=digest))

    def verify(
        self,
        key: str,
        signature: bytes,
        message: bytes | None = None,
        *,
        digest: bytes | None = None,
        version: int | None = None,
        allow_compromised: bool | None = None,
    ) -> R:
        """``{valid}``."""
        return self.call(
            "verify",
            _params(
                key=key,
                signature=signature,
                message=message,
                digest=digest,
                version=version,
                allow_compromised=allow_compromised,
            ),
        )

    def mac(self, key: str, message: bytes) -> R:
        """``{mac, version}``."""
        return self.call("mac", {"key": key, "message": message})

    def verify_mac(
        self,
        key: str,
        message: bytes,
        mac: bytes,
        version: int | None = None,
        allow_compromised: bool | None = None,
    ) -> R:
        """``{valid}``."""
        return self.call(
            "verify_mac",
            _params(key=key, message=message, mac=mac, version=version, allow_compromised=allow_compromised),
        )

    def approve(self, request_id: str, name: str | None = None) -> R:
        """``{approvals, required, done, key, op, requester, params, expires_at}``; with
        ``name``, only a request for that key is approved."""
        return self.call("approve", _params(request_id=request_id, name=name))

    def key_export(self, name: str, public_key: str, version: int | None = None) -> R:
        """Material wrapped for the recipient's RSA public key (PEM); see docs/distribution.md."""
        return self.call("key.export", _params(name=name, public_key=public_key, version=version))

    def key_import_params(self, type: str) -> R:
        """``{import_token, public_key, expires_at, ...}`` for one import."""
        return self.call("key.import_params", {"type": type})

    def key_import(self, import_token: str, wrapped: bytes, name: str, type: str, **opts: Any) -> R:
        """Store wrapped material as a new key (or, ``new_version=True``, a new version)."""
        return self.call(
            "key.import",
            _params(import_token=import_token, wrapped=wrapped, name=name, type=type, **opts),
        )

    def backup_create(
        self,
        *,
        recipient_public_key: str | None = None,
        passphrase: str | None = None,
        names: list[str] | None = None,
    ) -> R:
        """An encrypted, authenticated archive of the keys (admins only)."""
        return self.call(
            "backup.create",
            _params(recipient_public_key=recipient_public_key, passphrase=passphrase, names=names),
        )

    def cert_ca(self, ca_key: str) -> R:
        """A self-signed CA certificate for a signing key held by the broker."""
        return self.call("cert.ca", {"ca_key": ca_key})

    def cert_issue(self, ca_key: str, csr: str, validity_days: int | None = None) -> R:
        """A certificate for ``csr`` (PEM) signed by ``ca_key``."""
        return self.call("cert.issue", _params(ca_key=ca_key, csr=csr, validity_days=validity_days))

    def cert_list(self, ca_key: str | None = None, expiring_within_days: int | None = None) -> R:
        """Certificates issued, with their expiry."""
        return self.call("cert.list", _params(ca_key=ca_key, expiring_within_days=expiring_within_days))

    def report(self, days: int | None = None) -> R:
        """The compliance report (admins)."""
        return self.call("report", _params(days=days))


def _key_events(note: Notification) -> list[dict[str, Any]]:
    if note.method != "key.event":
        return []
    return [event for event in note.params if isinstance(event, dict)]


# -- where to connect ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """A Unix socket path, or a TLS endpoint (host, port, context, name to verify)."""

    socket_path: str | None
    host: str | None = None
    port: int | None = None
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @classmethod
    def of(
        cls,
        socket_path: str | Path | None,
        host: str | None,
        port: int | None,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> _Endpoint:
        if (socket_path is None) == (host is None):
            raise ValueError("give either socket_path or host/port/ssl_context")
        if socket_path is not None:
            return cls(str(socket_path))
        if port is None or ssl_context is None:
            raise ValueError("a TCP connection needs port and ssl_context (TLS is mandatory)")
        return cls(None, host, port, ssl_context, server_hostname or host)


# -- blocking client -----------------------------------------------------------


class Client(_Api[Any]):
    """A blocking client; one request at a time (calls from threads queue up).

    Args:
        socket_path: the broker's Unix socket; or else
        host, port, ssl_context: a TLS endpoint and a context from
            :func:`client_ssl_context`; ``server_hostname`` defaults to host.
        timeout: seconds to wait for connecting, sending or a reply
            (``TimeoutError``); None waits forever.
        max_message_bytes: largest reply accepted.
        busy_poll_us: after sending a request, read for the reply without
            sleeping for up to this many microseconds before blocking; 0
            blocks at once. A local broker often answers within tens of
            microseconds, while waking a sleeping thread (in a virtual
            machine, its virtual CPU) can take as long again: polling
            trades up to this much CPU per call for that latency. It adapts:
            after a poll that found no reply (a slow call, such as a key
            creation that waits for the disk), the next calls sleep at
            once, 1, then 2, 4... up to 64 calls, until a poll finds its
            reply again; and one thread per process polls at a time, the
            others sleep. Plain sockets with a timeout only (not TLS, not
            ``timeout=None``).
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        busy_poll_us: int = DEFAULT_BUSY_POLL_US,
    ) -> None:
        if busy_poll_us < 0:
            raise ValueError("busy_poll_us must not be negative")
        if timeout is not None and not 0 < timeout < math.inf:
            # 0 would make the socket non-blocking: a call still on its way would read as lost.
            raise ValueError("timeout must be a positive number of seconds, or None")
        self._endpoint = _Endpoint.of(socket_path, host, port, ssl_context, server_hostname)
        self._timeout = timeout
        self._busy_poll_s = busy_poll_us / 1e6
        self._poll_buffer = bytearray(_POLL_READ_SIZE) if busy_poll_us else None
        self._poll_backoff = 0  # calls to sleep at once after the next miss, when not 0
        self._poll_skip = 0  # calls left to sleep at once
        self._max = max_message_bytes
        self._lock = threading.RLock()
        self._packer = new_packer()
        self._sock: socket.socket | None = None
        self._decoder = ResponseDecoder(max_message_bytes)
        self._msgid = 0
        self._notes: collections.deque[Notification] = collections.deque()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call reconnects). Idempotent."""
        with self._lock:
            self._drop()

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one request and wait for its reply.

        Returns:
            The method's result.

        Raises:
            BrokerError: the broker's error, as its typed subclass.
            ConnectionLost: the reply to a state-changing request was lost.
            TimeoutError: no reply within ``timeout``.
            OSError: the broker cannot be reached.
        """
        with self._lock:
            for attempt in (0, 1):
                sock = self._ensure()
                self._msgid = (self._msgid + 1) & MAX_MSGID
                msgid = self._msgid
                try:
                    self._send(sock, encode_request(msgid, method, params, self._packer))
                except TimeoutError:
                    # The broker is not reading: another try would only wait as long again.
                    self._drop()
                    raise
                except OSError as exc:
                    # The broker cannot have read the whole request (it only
                    # acts on complete messages): safe to send it again.
                    self._drop()
                    if attempt:
                        raise ConnectionLost(f"connection lost sending {method}") from exc
                    continue
                try:
                    return _unwrap(self._wait(msgid))
                except _Lost:
                    self._drop()
                    if attempt or method not in IDEMPOTENT_METHODS:
                        raise ConnectionLost(f"connection lost waiting for the reply to {method}") from None
            raise AssertionError("unreachable")

    def subscribe(self, prefix: str | None = None) -> Iterator[dict[str, Any]]:
        """Subscribe to key events and yield them (blocking, no timeout).

        The subscription takes the client for as long as it is iterated
        (calls from other threads wait): give it a client of its own. When
        the iterator is closed, the connection is closed with it, so that
        no events pile up for it; the next call connects afresh.

        Raises:
            ConnectionLost: the connection broke; subscribe again.
        """
        with self._lock:
            self.call("subscribe", _params(prefix=prefix))
            sock = self._sock
            assert sock is not None
            sock.settimeout(None)
            try:
                while True:
                    while self._notes:
                        yield from _key_events(self._notes.popleft())
                    try:
                        self._read_some(sock)
                    except _Lost:
                        self._drop()
                        raise ConnectionLost("subscription connection lost") from None
            finally:
                if self._sock is sock:
                    self._drop()  # ends the broker's feed to this connection
                self._notes.clear()

    # -- internals -----------------------------------------------------------

    def _ensure(self) -> socket.socket:
        if self._sock is not None and not self._alive(self._sock):
            self._drop()
        if self._sock is None:
            self._sock = self._connect()
            self._decoder = ResponseDecoder(self._max)
        return self._sock

    def _connect(self) -> socket.socket:
        end = self._endpoint
        if end.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._timeout)
                sock.connect(end.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert end.host is not None and end.port is not None and end.ssl_context is not None
        raw = socket.create_connection((end.host, end.port), timeout=self._timeout)
        try:
            return end.ssl_context.wrap_socket(raw, server_hostname=end.server_hostname)
        except BaseException:
            raw.close()
            raise

    def _alive(self, sock: socket.socket) -> bool:
        """False when the broker already closed this (idle) connection.

        Checked before sending, so a request is never sent into a connection
        the broker has closed -- that would leave its fate unknown.
        """
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                self._read_some(sock)
        except (_Lost, OSError, ValueError):
            return False
        return True

    def _direct(self, sock: socket.socket) -> bool:
        """May ``sock``'s descriptor be read and written directly, without waiting?

        A plain socket with a timeout is non-blocking underneath (Python
        waits with poll(2) before each call); TLS has a state of its own.
        """
        return self._timeout is not None and not isinstance(sock, ssl.SSLSocket)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """Send ``data`` whole: written at once where the socket takes it, else waiting as sendall does."""
        sent = 0
        if self._direct(sock):
            with contextlib.suppress(BlockingIOError):
                sent = os.write(sock.fileno(), data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])

    def _read_some(self, sock: socket.socket) -> list[Response]:
        try:
            data = sock.recv(_RECEIVE_SIZE)
        except TimeoutError:
            raise
        except OSError:
            raise _Lost from None
        return self._decode(data)

    def _poll(self, sock: socket.socket) -> list[Response]:
        """The replies a busy poll finds (:meth:`_poll_replies`), unless this
        call is to sleep at once: backing off after a miss, or another
        thread is polling."""
        if self._poll_skip:
            self._poll_skip -= 1
            return []
        if not _PollSlot.lock.acquire(blocking=False):
            return []
        try:
            replies = self._poll_replies(sock)
        finally:
            _PollSlot.lock.release()
        if replies:
            self._poll_backoff = 0
        else:
            self._poll_backoff = min(2 * self._poll_backoff or 1, _MAX_POLL_BACKOFF)
            self._poll_skip = self._poll_backoff
        return replies

    def _poll_replies(self, sock: socket.socket) -> list[Response]:
        """The first replies to arrive within ``busy_poll_us``, read without sleeping; empty if none did."""
        assert self._poll_buffer is not None
        fd, buffer = sock.fileno(), self._poll_buffer
        # The decoder copies what it keeps, so the buffer can be read into again.
        view = memoryview(buffer)
        # Never past the call's timeout: after that the broker is not answering.
        window = min(self._busy_poll_s, self._timeout if self._timeout is not None else math.inf)
        deadline = time.perf_counter() + window
        while True:
            try:
                count = os.readv(fd, [buffer])
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return []
                continue
            except OSError:
                raise _Lost from None
            replies = self._decode(view[:count])
            if replies:
                return replies

    def _decode(self, data: bytes | memoryview) -> list[Response]:
        """The replies in ``data`` (notifications are queued); empty ``data`` is the end of the connection."""
        if not data:
            raise _Lost
        try:
            events = self._decoder.feed(data)
        except ProtocolError:
            raise _Lost from None
        responses: list[Response] = []
        for event in events:
            if isinstance(event, Notification):
                self._notes.append(event)
            else:
                responses.append(event)
        return responses

    def _wait(self, msgid: int) -> Response:
        sock = self._sock
        assert sock is not None
        if self._busy_poll_s and self._direct(sock):
            for response in self._poll(sock):
                if response.msgid == msgid:
                    return response
        while True:
            for response in self._read_some(sock):
                # Replies to calls that timed out earlier are dropped here.
                if response.msgid == msgid:
                    return response

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- trio client ---------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None


class _AsyncConnection:
    """One stream: callers send under a lock, a reader task routes replies."""

    def __init__(self, stream: trio.abc.Stream, max_message_bytes: int) -> None:
        self.stream = stream
        self.io = stream_io(stream)
        self.decoder = ResponseDecoder(max_message_bytes)
        self.packer = new_packer()
        self.send_lock = trio.StrictFIFOLock()
        self.waiters: dict[int, _Waiter] = {}
        self.subscribers: set[trio.MemorySendChannel[Notification]] = set()
        self.broken = False
        self.msgid = 0

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.io.receive()
                if not data:
                    return
                for event in self.decoder.feed(data):
                    if isinstance(event, Notification):
                        for channel in list(self.subscribers):
                            try:
                                channel.send_nowait(event)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                # Its subscription ended: that is no reason to end the connection.
                                self.subscribers.discard(channel)
                    elif (waiter := self.waiters.get(event.msgid)) is not None:
                        waiter.response = event
                        waiter.event.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            return
        finally:
            self.fail()

    async def _send(self, payload: bytes) -> None:
        """Send one request; the caller holds the send lock."""
        if self.broken:
            raise _NotSent
        try:
            await self.io.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The broker cannot have read all of it: not acted on.
            self.fail()
            raise _NotSent from None
        except BaseException:
            # Cancelled (or failed) part-way: the broker may hold the start of
            # this request and would read the next one's bytes as its rest.
            # This connection is done; the next call opens another.
            self.fail()
            raise

    def fail(self) -> None:
        """Mark broken; wake every caller still waiting and end subscriptions."""
        self.broken = True
        for waiter in self.waiters.values():
            waiter.event.set()
        for channel in self.subscribers:
            channel.close()
        self.subscribers.clear()

    async def request(self, method: str, params: dict[str, Any]) -> Response:
        if self.broken:
            raise _NotSent
        self.msgid = (self.msgid + 1) & MAX_MSGID
        msgid = self.msgid
        payload = encode_request(msgid, method, params, self.packer)
        waiter = self.waiters[msgid] = _Waiter()
        try:
            # Unless another caller is mid-send, write at once: on a plain
            # socket a write that completes never yields to the scheduler.
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                await self.send_lock.acquire()
            try:
                await self._send(payload)
            finally:
                self.send_lock.release()
            await waiter.event.wait()
        finally:
            del self.waiters[msgid]
        if waiter.response is None:
            raise _Lost
        return waiter.response


class AsyncClient(_Api[Awaitable[Any]]):
    """A trio client; concurrent calls from many tasks are pipelined.

    Use as ``async with AsyncClient(socket_path) as client:`` -- the context
    runs the task that reads replies.

    Args: as :class:`Client`, without ``timeout`` (wrap calls in
        ``trio.fail_after``).
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._endpoint = _Endpoint.of(socket_path, host, port, ssl_context, server_hostname)
        self._max = max_message_bytes
        self._conn: _AsyncConnection | None = None
        self._connect_lock = trio.Lock()
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        try:
            await self._ensure()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        stack, self._stack, self._nursery = self._stack, None, None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The reader task never raises, so a group holding only the
            # body's own exception is the nursery's wrapping: undo it, so
            # callers can catch BrokerError / ConnectionLost directly.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from exc.__cause__
            raise

    async def aclose(self) -> None:
        """Close the connection; the client is unusable after its context exits."""
        if self._conn is not None:
            self._conn.fail()
            await trio.aclose_forcefully(self._conn.stream)
            self._conn = None

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one request and wait for its reply; see :meth:`Client.call`.

        Cancellation: abandons the wait; a reply arriving later is dropped.
        """
        for attempt in (0, 1):
            conn = await self._ensure()
            try:
                return _unwrap(await conn.request(method, params))
            except _NotSent:
                if attempt:
                    raise ConnectionLost(f"connection lost sending {method}") from None
            except _Lost:
                if attempt or method not in IDEMPOTENT_METHODS:
                    raise ConnectionLost(f"connection lost waiting for the reply to {method}") from None
        raise AssertionError("unreachable")

    async def subscribe(self, prefix: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Subscribe to key events and yield them as they come.

        Several subscriptions may share the client's connection; each yields
        only the events under its own prefix.

        Raises:
            ConnectionLost: the connection broke; subscribe again.
        """
        conn = await self._ensure()
        send, receive = trio.open_memory_channel[Notification](math.inf)
        conn.subscribers.add(send)
        try:
            await self.call("subscribe", _params(prefix=prefix))
            if self._conn is not conn:
                raise ConnectionLost("connection lost while subscribing")
            async with receive:
                async for note in receive:
                    for event in _key_events(note):
                        if prefix is None or str(event.get("name", "")).startswith(prefix):
                            yield event
            raise ConnectionLost("subscription connection lost")
        finally:
            conn.subscribers.discard(send)

    async def _ensure(self) -> _AsyncConnection:
        if self._nursery is None:
            raise RuntimeError("use AsyncClient as 'async with AsyncClient(...) as client'")
        if self._conn is not None and not self._conn.broken:
            return self._conn  # the usual case, without taking the lock
        async with self._connect_lock:
            if self._conn is None or self._conn.broken:
                if self._conn is not None:
                    await trio.aclose_forcefully(self._conn.stream)
                    self._conn = None
                stream = await self._open_stream()
                conn = _AsyncConnection(stream, self._max)
                self._nursery.start_soon(conn.read_loop)
                self._conn = conn
            return self._conn

    async def _open_stream(self) -> trio.abc.Stream:
        end = self._endpoint
        if end.socket_path is not None:
            return await trio.open_unix_socket(end.socket_path)
        assert end.host is not None and end.port is not None and end.ssl_context is not None
        tcp = await trio.open_tcp_stream(end.host, end.port)
        tls = trio.SSLStream(tcp, end.ssl_context, server_hostname=end.server_hostname)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls
