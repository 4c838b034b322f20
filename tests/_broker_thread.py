"""A broker running on its own trio loop in a thread, for synchronous tests
(hypothesis state machines, crash drivers)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import trio

from broker.app import Broker, open_broker
from broker.auth import Principal
from broker.config import Config, parse_config
from broker.connection import RequestContext


class BrokerThread:
    """Start a broker in a thread; call its method table synchronously."""

    def __init__(self, config: Config, principal: str | None = None) -> None:
        self.config = config
        self.ctx = RequestContext(Principal(principal or f"uid:{os.getuid()}", "local"), 0)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    @classmethod
    def at(cls, data_dir: Path) -> BrokerThread:
        return cls(parse_config({}, data_dir=data_dir))

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with open_broker(self.config) as broker:
            self.broker: Broker = broker
            self.token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def call(self, method: str, **params: Any) -> Any:
        """Run one request; BrokerError subclasses propagate."""
        return trio.from_thread.run(
            self.broker.dispatcher.handle, self.ctx, method, params, trio_token=self.token
        )

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(30)
