"""Several in-process brokers sharing one PostgreSQL database (tests and bench).

Each broker has its own data directory (audit chain, socket) and the same
DSN; all share one root of trust: the first broker creates ``root.key``
and it is copied into the others' data directories before they start, as
docs/cluster.md tells operators to do.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from broker.app import Broker, open_broker
from broker.config import Config, parse_config
from tests.conftest import Caller

__all__ = ["Node", "cluster_config", "start_node", "start_nodes"]

ROOT_FILE = "root.key"


def cluster_config(data_dir: Path, dsn: str, index: int, **postgres: Any) -> Config:
    """The config of broker ``index``: its own data dir and node name, the shared DSN."""
    options: dict[str, Any] = {"dsn": dsn, "leader_retry_s": 0.5, "statement_timeout_s": 5.0,
                               "call_timeout_s": 8.0, **postgres}
    table: Mapping[str, Any] = {"store": "postgres", "node": f"node-{index}"}
    return parse_config({**table, "plugins": {"postgres": options}}, data_dir=data_dir)


@dataclass
class Node:
    """One running broker and a way to stop it."""

    broker: Broker
    call: Caller
    stop_requested: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)

    def is_leader(self) -> bool:
        return self.broker.scheduler.is_leader()

    async def stop(self) -> None:
        """Close the broker (store, cluster session and all) and wait until it is closed."""
        self.stop_requested.set()
        await self.stopped.wait()


async def _run(config: Config, owner: str, *, task_status: trio.TaskStatus[Node]) -> None:
    stop_requested, stopped = trio.Event(), trio.Event()
    try:
        async with open_broker(config) as broker:
            task_status.started(Node(broker, Caller(broker, owner), stop_requested, stopped))
            await stop_requested.wait()
    finally:
        stopped.set()


async def start_node(nursery: trio.Nursery, config: Config, owner: str, *, root_from: Path | None) -> Node:
    """Start a broker in ``nursery``; with ``root_from``, copy that root key in first."""
    if root_from is not None:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = config.data_dir / ROOT_FILE
        shutil.copyfile(root_from / ROOT_FILE, target)
        os.chmod(target, 0o600)
    node: Node = await nursery.start(_run, config, owner)
    return node


async def start_nodes(nursery: trio.Nursery, configs: list[Config], owner: str) -> list[Node]:
    """Start brokers one after the other, sharing the first one's root key."""
    nodes = [await start_node(nursery, configs[0], owner, root_from=None)]
    for config in configs[1:]:
        nodes.append(await start_node(nursery, config, owner, root_from=configs[0].data_dir))
    return nodes
