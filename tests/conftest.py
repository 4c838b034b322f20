"""Shared fixtures: bounded hypothesis profiles, brokers in-process and on a socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings

from broker.app import Broker, open_broker, serve_broker
from broker.auth import Principal
from broker.config import Config, parse_config
from broker.connection import RequestContext
from broker.server import ServerInfo

# CI runs bounded example counts; `long` is for bench/ and local soak runs.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REQUIRE_ALL = os.environ.get("KEYBROKER_REQUIRE_ALL") == "1"


def require(available: bool, what: str) -> None:
    """Skip a test whose real component is missing -- or fail, in CI."""
    if available:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required (KEYBROKER_REQUIRE_ALL=1) but missing")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (AF_UNIX paths are < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(short_tmp: Path) -> ConfigFactory:
    """Build a Config for a data dir under ``short_tmp`` from a TOML-like mapping."""

    def make(table: dict[str, Any] | None = None, *, name: str = "data") -> Config:
        return parse_config(table or {}, data_dir=short_tmp / name)

    return make


@pytest.fixture
def owner() -> str:
    return f"uid:{os.getuid()}"


def local_context(name: str) -> RequestContext:
    """A request context for an in-process caller named ``name``."""
    return RequestContext(Principal(name=name, transport="local"), connection_id=0)


@pytest.fixture
async def broker(make_config: ConfigFactory) -> AsyncIterator[Broker]:
    """An in-process broker on embedded defaults (SQLite, root key file)."""
    async with open_broker(make_config()) as opened:
        yield opened


class Caller:
    """Calls a broker's method table in-process as one principal."""

    def __init__(self, broker: Broker, principal: str) -> None:
        self.broker = broker
        self.ctx = local_context(principal)

    async def __call__(self, method: str, **params: Any) -> Any:
        return await self.broker.dispatcher.handle(self.ctx, method, params)


@pytest.fixture
def admin(broker: Broker, owner: str) -> Caller:
    """The broker's owner uid: admin on every key under embedded defaults."""
    return Caller(broker, owner)


@pytest.fixture
async def served(make_config: ConfigFactory, nursery: trio.Nursery) -> AsyncIterator[ServerInfo]:
    """A broker on embedded defaults serving its Unix socket."""
    info: ServerInfo = await nursery.start(serve_broker, make_config())
    yield info
    info.shutdown.set()
