"""Sans-IO MessagePack-RPC framing: bytes in, events out; replies encoded.

Nothing here touches a socket or a clock, so the whole module is tested with
plain bytes (and hypothesis).

Decoding happens in two passes, for memory safety. A msgpack container
header declares its element count before the elements arrive, and the
constructing unpacker preallocates a list of that size at once: a few bytes
of nested ``array32`` headers would pin hundreds of megabytes per connection.
So a *scanning* unpacker (``Unpacker.skip``, which builds no objects and
allocates nothing per declared element) finds where each message ends, and
only a complete message -- whose declared lengths are all backed by bytes
already received -- is decoded into Python objects.

Outcomes of :meth:`RequestDecoder.feed`, which are the only ones it has:

* :class:`Request` -- a well-formed ``[0, msgid, method, [params]]``.
* :class:`BadRequest` -- a complete message whose msgid can be read but which
  is not a valid request (wrong shape or types, non-UTF-8 strings, map keys
  that are not strings, ...): answer ``invalid_request`` with that msgid.
* :class:`ProtocolError` raised -- the stream cannot be decoded any further
  (not msgpack, over the size limit, or no readable msgid): read no more,
  and close the connection once the requests that came complete before the
  bad bytes are answered. The error carries those of them that the same
  ``feed`` call decoded, in :attr:`ProtocolError.events`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack

__all__ = [
    "MAX_MSGID",
    "BadRequest",
    "Notification",
    "ProtocolError",
    "Request",
    "RequestDecoder",
    "Response",
    "ResponseDecoder",
    "encode_notification",
    "encode_request",
    "encode_response",
    "new_packer",
]

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2
_E = TypeVar("_E")
# msgpack-rpc msgids are uint32.
MAX_MSGID: Final = 2**32 - 1

# Errors the msgpack C extension (and its pure-Python fallback) raises for a
# stream that is not msgpack or nests too deeply; all mean "cannot continue".
_STREAM_ERRORS = (msgpack.UnpackException, ValueError, TypeError)


class ProtocolError(Exception):
    """The byte stream cannot be decoded any further; close the connection.

    ``reason`` is a short, fixed phrase for logs (never peer-supplied data).
    ``events`` are the messages the failing ``feed`` call decoded before the
    bad bytes, in stream order: still to be handled.
    """

    def __init__(self, reason: str, events: list[Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.events: list[Any] = events or []


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request: ``[0, msgid, method, [params]]``."""

    msgid: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A complete message with a readable msgid that is not a valid request."""

    msgid: int
    reason: str


@dataclass(frozen=True, slots=True)
class Response:
    """A response, as the client sees it: exactly one of error/result is set."""

    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    """A server-to-client notification: ``[2, method, params]``."""

    method: str
    params: list[Any]


def _is_uint32(value: object) -> bool:
    # bool is an int subclass; msgpack true/false are never a msgid.
    return type(value) is int and 0 <= value <= MAX_MSGID


class _FrameSplitter:
    """Cuts a byte stream into complete msgpack messages without building them.

    Args:
        max_message_bytes: the largest message accepted; a message that grows
            past it raises :class:`ProtocolError` before more of it is buffered.
    """

    __slots__ = ("_buf", "_limit", "_scanner", "_start")

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self._limit = max_message_bytes
        # Never holds more than the current partial message (see feed), so
        # max_buffer_size can equal the limit without spurious BufferFull.
        self._scanner = msgpack.Unpacker(max_buffer_size=max_message_bytes)
        # Bytes of the stream from self._start on that are not yet cut into
        # frames: at most one partial message after feed returns.
        self._buf = bytearray()
        self._start = 0

    @property
    def in_progress(self) -> bool:
        """True while part of a message has arrived but not all of it."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes], ProtocolError | None]:
        """Take more bytes; return every message they complete, in order, and
        the error that stopped the stream after them (None if it goes on).

        The error is that the stream is not msgpack, or that a message
        exceeds the size limit; no more bytes may be fed after it.
        """
        if not self._buf and len(data) <= self._limit:
            return self._feed_fresh(data if type(data) is bytes else bytes(data))
        frames: list[bytes] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            room = self._limit - len(self._buf)
            if room <= 0:
                return frames, ProtocolError("message too large")
            chunk = view[pos : pos + room]
            pos += len(chunk)
            self._scanner.feed(chunk)
            self._buf += chunk
            cut = 0
            ends, error = self._message_ends(len(self._buf))
            for end in ends:
                frames.append(bytes(self._buf[cut:end]))
                cut = end
            if error is not None:
                return frames, error
            if cut:
                del self._buf[:cut]
                self._start += cut
        return frames, None

    def _feed_fresh(self, data: bytes) -> tuple[list[bytes], ProtocolError | None]:
        """The common case: no partial message pending and a chunk that fits.

        Frames are sliced straight from ``data`` (no copy when one message
        is the whole chunk), and only a trailing partial message is kept.
        """
        scanner = self._scanner
        scanner.feed(data)
        try:
            scanner.skip()
        except msgpack.OutOfData:  # the scanner rewinds: _message_ends sees it again
            first = None
        except _STREAM_ERRORS:
            return [], ProtocolError("undecodable stream")
        else:
            first = scanner.tell() - self._start
            if first == len(data):  # one whole message: the request-reply case
                self._start += first
                return [data], None
        ends, error = self._message_ends(len(data), first)
        if not ends:
            frames: list[bytes] = []
        else:
            frames = [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        if error is not None:
            return frames, error
        cut = ends[-1] if ends else 0
        if cut < len(data):
            self._buf += data[cut:]
        self._start += cut
        return frames, None

    def _message_ends(
        self, buffered: int, first: int | None = None
    ) -> tuple[list[int], ProtocolError | None]:
        """Offsets in the ``buffered`` bytes where complete messages end, and
        the error that stops the stream after them (None if it goes on).

        ``first``: the end of the first message, already skipped by the caller.
        """
        ends: list[int] = [] if first is None else [first]
        scanner = self._scanner
        while True:
            try:
                scanner.skip()
            except msgpack.OutOfData:
                return ends, None
            except _STREAM_ERRORS:
                return ends, ProtocolError("undecodable stream")
            end = scanner.tell() - self._start
            ends.append(end)
            if end == buffered:
                # Reads usually end on a message boundary (one request per
                # read): skip the OutOfData a further skip() would raise.
                return ends, None


class RequestDecoder:
    """Server side: bytes from a client → :class:`Request` / :class:`BadRequest`.

    Args:
        max_message_bytes: limit on one request's encoded size.
    """

    __slots__ = ("_splitter",)

    def __init__(self, max_message_bytes: int) -> None:
        self._splitter = _FrameSplitter(max_message_bytes)

    @property
    def in_progress(self) -> bool:
        """True while a request has started arriving but is not complete."""
        return self._splitter.in_progress

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request | BadRequest]:
        """Take more bytes and return the requests they complete.

        Returns:
            One event per complete message, in stream order.

        Raises:
            ProtocolError: close the connection (see the module docstring).
        """
        frames, error = self._splitter.feed(data)
        if error is None and len(frames) == 1:
            return [_request_event(frames[0])]  # request-reply: one per read
        return _events(frames, error, _request_event)


def _events(frames: list[bytes], error: ProtocolError | None, event: Callable[[bytes], _E]) -> list[_E]:
    """``event`` of each frame, in order.

    Raises:
        ProtocolError: ``error``, or the first frame's that ``event`` raises,
            carrying the events of the frames before it.
    """
    events: list[_E] = []
    for frame in frames:
        try:
            events.append(event(frame))
        except ProtocolError as exc:
            raise ProtocolError(exc.reason, events) from None
    if error is not None:
        raise ProtocolError(error.reason, events)
    return events


def _request_event(frame: bytes) -> Request | BadRequest:
    try:
        # The frame is complete, so every declared length is already backed
        # by received bytes; unpackb's defaults bound lengths by len(frame).
        # strict_map_key: only str/bytes keys, so no tuple/int-keyed dicts.
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except _STREAM_ERRORS:
        return _salvage_msgid(frame, "undecodable message")
    return _request(msg)


def _request(msg: Any) -> Request | BadRequest:
    """The request a decoded message holds.

    Raises:
        ProtocolError: it has no readable msgid.
    """
    if type(msg) is not list:
        raise ProtocolError("message is not an array")
    if len(msg) < 2 or not _is_uint32(msg[1]):
        raise ProtocolError("no readable msgid")
    msgid: int = msg[1]
    if len(msg) != 4 or type(msg[0]) is not int or msg[0] != REQUEST:
        return BadRequest(msgid, "not a request frame")
    method, params = msg[2], msg[3]
    if type(method) is not str:
        return BadRequest(msgid, "method is not a string")
    if type(params) is not list or len(params) != 1 or type(params[0]) is not dict:
        return BadRequest(msgid, "params must be an array of exactly one map")
    args: dict[str, Any] = params[0]
    if not all(type(k) is str for k in args):
        return BadRequest(msgid, "parameter names must be strings")
    return Request(msgid, method, args)


def _salvage_msgid(frame: bytes, reason: str) -> BadRequest:
    """A message that does not decode as a whole may still carry a msgid.

    Raises:
        ProtocolError: when it does not.
    """
    reader = msgpack.Unpacker(raw=True, max_buffer_size=len(frame))
    reader.feed(frame)
    try:
        if reader.read_array_header() >= 2:
            reader.skip()
            msgid = reader.unpack()
            if _is_uint32(msgid):
                return BadRequest(msgid, reason)
    except _STREAM_ERRORS:
        pass
    raise ProtocolError("no readable msgid")


class ResponseDecoder:
    """Client side: bytes from the broker → :class:`Response` / :class:`Notification`.

    Args:
        max_message_bytes: limit on one reply's encoded size.
    """

    __slots__ = ("_splitter",)

    def __init__(self, max_message_bytes: int) -> None:
        self._splitter = _FrameSplitter(max_message_bytes)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Response | Notification]:
        """Take more bytes and return the replies they complete.

        Raises:
            ProtocolError: the broker sent something that is not msgpack-rpc.
        """
        return _events(*self._splitter.feed(data), _reply_event)


def _reply_event(frame: bytes) -> Response | Notification:
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except _STREAM_ERRORS:
        raise ProtocolError("undecodable reply") from None
    return _reply(msg)


def _reply(msg: Any) -> Response | Notification:
    """The response or notification a decoded message holds.

    Raises:
        ProtocolError: it is neither.
    """
    if type(msg) is list and len(msg) == 4 and msg[0] == RESPONSE and _is_uint32(msg[1]):
        return Response(msg[1], msg[2], msg[3])
    if type(msg) is list and len(msg) == 3 and msg[0] == NOTIFICATION and type(msg[2]) is list:
        return Notification(str(msg[1]), msg[2])
    raise ProtocolError("not a response or notification")


# Packing: use_bin_type keeps bytes as msgpack bin and str as str, which the
# wire contract requires. One Packer per caller thread; reusing it avoids the
# per-call construction msgpack.packb pays.
def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, autoreset=True)


_PACKER = _packer()


def encode_response(msgid: int, error: Any, result: Any, packer: msgpack.Packer | None = None) -> bytes:
    """Encode ``[1, msgid, error, result]``.

    Args:
        packer: a Packer to reuse (not thread-safe); the module's by default.

    Raises:
        TypeError / ValueError: ``result`` or ``error`` is not msgpack-encodable.
    """
    packed: bytes = (packer or _PACKER).pack([RESPONSE, msgid, error, result])
    return packed


def encode_request(
    msgid: int, method: str, params: dict[str, Any], packer: msgpack.Packer | None = None
) -> bytes:
    """Encode ``[0, msgid, method, [params]]``.

    Raises:
        TypeError / ValueError: a parameter is not msgpack-encodable.
    """
    packed: bytes = (packer or _PACKER).pack([REQUEST, msgid, method, [params]])
    return packed


def encode_notification(method: str, params: list[Any], packer: msgpack.Packer | None = None) -> bytes:
    """Encode ``[2, method, params]``.

    Raises:
        TypeError / ValueError: a parameter is not msgpack-encodable.
    """
    packed: bytes = (packer or _PACKER).pack([NOTIFICATION, method, params])
    return packed


def new_packer() -> msgpack.Packer:
    """A Packer configured for the wire contract, for one thread's exclusive use."""
    return _packer()
