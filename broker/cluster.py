"""Coordination between brokers that share one store.

A store that several brokers share (PostgreSQL) comes with a cluster
provider (hook ``kb_cluster``): it tells this broker which keys other
brokers changed, so the cache can drop them at once, and whether this broker
is the one that runs the scheduler now. A store of one broker (SQLite) needs
none: :class:`Solo` is used, which is always the leader and hears nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

__all__ = ["Cluster", "Solo"]


class Cluster(Protocol):
    """Change notifications and scheduler leadership for a shared store."""

    async def run(
        self, changed: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Report the name of every key another broker changes, until cancelled.

        Call ``task_status.started()`` once listening; from then on no change
        committed by another broker may go unreported. While the connection
        to the store is lost, report nothing and keep trying; on reconnect,
        call ``changed("*")`` (everything may have changed meanwhile).
        Leadership is kept up to date here too.
        """

    def is_leader(self) -> bool:
        """Whether this broker runs the scheduler now (at most one at a time)."""


class Solo:
    """The cluster of one: always leader, no other broker to hear from."""

    async def run(
        self, changed: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    def is_leader(self) -> bool:
        return True
