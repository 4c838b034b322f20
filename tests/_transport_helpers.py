"""Shared fixtures for the transport tests: a small handler, configs, raw clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from broker.config import Config, Limits, TLSConfig
from broker.connection import RequestContext
from broker.errors import UnknownMethod, error_for_code
from broker.protocol import Notification, Response, ResponseDecoder, encode_request
from broker.server import ServerInfo, serve


class EchoHandler:
    """Echo, sleep, wait on a gate, raise errors; records what it saw."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.started = 0
        self.finished = 0
        self.gate = trio.Event()
        self.closed: list[int] = []
        self.tasks: list[trio.lowlevel.Task] = []  # the task that ran each request

    async def handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        self.active += 1
        self.started += 1
        self.tasks.append(trio.lowlevel.current_task())
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._handle(ctx, method, params)
        finally:
            self.active -= 1
            self.finished += 1

    async def _handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        if method == "echo":
            return params
        if method == "grow":
            return {"b": b"x" * params["n"]}
        if method == "grow_later":
            # Announces its response, as datakey does, then suspends before making it.
            ctx.expect_response(params["n"])
            await trio.sleep(params["s"])
            return {"b": b"x" * params["n"]}
        if method == "sleep":
            await trio.sleep(params["s"])
            return {"slept": params["s"]}
        if method == "gate":
            await self.gate.wait()
            return {"gate": True}
        if method == "fail":
            cls = error_for_code(params["code"])
            raise cls(params.get("message", "failed"), params.get("details"))
        if method == "boom":
            # Built at run time, so only the exception's message holds it
            # (tracebacks quote source lines).
            raise RuntimeError("-".join(["secret", "material", "in", "exception"]))
        if method == "unencodable":
            return {"x": object()}
        if method == "whoami":
            p = ctx.principal
            return {"name": p.name, "transport": p.transport, "uid": p.uid, "gid": p.gid, "pid": p.pid}
        if method == "notify":
            await ctx.notify("key.event", [params])
            return {}
        if method == "subscribe":
            ctx.keep_open = True
            return {}
        raise UnknownMethod(f"no method {method!r}")

    def connection_closed(self, ctx: RequestContext) -> None:
        self.closed.append(ctx.connection_id)


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A directory whose paths fit AF_UNIX's 108-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(directory: Path, *, tls: TLSConfig | None = None, **limits: Any) -> Config:
    return Config(
        data_dir=directory,
        socket_path=directory / "kb.sock",
        tls=tls,
        limits=Limits(**limits),
        principals={},
    )


@asynccontextmanager
async def running_server(config: Config, handler: Any) -> AsyncIterator[ServerInfo]:
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, config, handler)
        yield info
        nursery.cancel_scope.cancel()


class RawConn:
    """A bare msgpack-rpc peer for poking at the server."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = ResponseDecoder(1 << 26)
        self.buffered: list[Response | Notification] = []

    @classmethod
    async def open(cls, path: Path) -> RawConn:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, msgid: int, method: str, params: dict[str, Any] | None = None) -> None:
        await self.send(encode_request(msgid, method, params or {}))

    async def next(self) -> Response | Notification:
        while not self.buffered:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError
            self.buffered.extend(self.decoder.feed(data))
        return self.buffered.pop(0)

    async def response(self) -> Response:
        event = await self.next()
        assert isinstance(event, Response), event
        return event

    async def responses(self, n: int) -> list[Response]:
        return [await self.response() for _ in range(n)]

    async def call(self, msgid: int, method: str, params: dict[str, Any] | None = None) -> Response:
        await self.request(msgid, method, params)
        return await self.response()

    async def expect_closed(self) -> None:
        """The server closes the connection (EOF or reset), sending nothing more."""
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            assert not self.decoder.feed(data), "unexpected reply before close"

    async def aclose(self) -> None:
        await self.stream.aclose()
