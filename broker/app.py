"""Assembling a broker: plugins, root of trust, store, backends, audit, service.

:func:`open_broker` gives an in-process broker (what the server, the tests
and embedding applications use); :func:`serve_broker` puts it on the wire.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from .approvals import Approvals
from .audit import AuditLog, open_audit_log
from .backend import Backend
from .certs import CertPolicy
from .config import Config
from .errors import Unavailable
from .metrics import Metrics
from .plugins import Plugins
from .rpc import Dispatcher
from .scheduler import Scheduler
from .server import ServerInfo, serve
from .service import KeyService
from .store import Store
from .subscriptions import Subscriptions

__all__ = ["Broker", "open_broker", "serve_broker"]


@dataclass(frozen=True, slots=True)
class Broker:
    config: Config
    plugins: Plugins
    store: Store
    backends: dict[str, Backend]
    audit: AuditLog
    service: KeyService
    dispatcher: Dispatcher
    scheduler: Scheduler
    metrics: Metrics
    # The bound /metrics port when [metrics] is configured.
    metrics_port: int | None


def prepare_data_dir(config: Config) -> None:
    """Create the data directory 0700 (and tighten it if it exists).

    Raises:
        Unavailable: the directory belongs to another user, who could
            replace the root key, the store or the audit log inside it.
        OSError: the directory cannot be created or read.
    """
    data_dir = config.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = data_dir.stat().st_uid
    if owner != os.geteuid():
        raise Unavailable(
            f"data directory {data_dir} is owned by uid {owner}, not by this broker's user "
            f"(uid {os.geteuid()}); run the broker as its owner, or give it a directory of its own"
        )
    os.chmod(data_dir, 0o700)


@asynccontextmanager
async def open_broker(
    config: Config,
    *,
    extra_plugins: Sequence[object] = (),
    entry_points: bool = True,
    clock: Callable[[], float] = time.time,
    run_scheduler: bool = True,
) -> AsyncIterator[Broker]:
    """Start every part of a broker except the listeners; close them all on exit.

    Args:
        config: the configuration.
        extra_plugins: plugin objects registered after the entry points.
        entry_points: load the ``keybroker`` entry-point group.
        clock: wall-clock time source (tests pass a fake one).
        run_scheduler: run the scheduler task (tests drive
            ``broker.scheduler.run_once`` themselves instead).

    Raises:
        InvalidArgument: a bad option in ``[plugins.certificates]``.
        StartupError: plugins missing or clashing.
        Unavailable: the data directory belongs to another user.
        OSError: the data directory cannot be used.
    """
    # [plugins.certificates] belongs to the broker itself, not to a plugin
    # that would check it on loading; cert.* and the scheduler read it later.
    CertPolicy.from_config(config.section("certificates"))
    prepare_data_dir(config)
    plugins = Plugins(config, extra=extra_plugins, entry_points=entry_points)
    async with AsyncExitStack() as stack:
        root = plugins.root_key()
        await root.open()
        stack.push_async_callback(root.aclose)
        store = plugins.store()
        await store.open()
        stack.push_async_callback(store.aclose)
        backends = plugins.backends(root)
        for backend in backends.values():
            await backend.open()
            stack.push_async_callback(backend.aclose)
        audit = await stack.enter_async_context(
            open_audit_log(
                plugins.audit_sinks(), node=config.node, clock=clock,
                sync_interval=config.audit.staged_interval,
            )
        )
        service = KeyService(store=store, backends=backends, plugins=plugins, clock=clock)
        cluster = plugins.cluster(store)
        metrics = Metrics()
        scheduler = Scheduler(service, audit, is_leader=cluster.is_leader, metrics=metrics)
        # Background work (cluster feed, scheduler, subscription feeds) stops
        # before the audit log, store and backends close.
        background = await stack.enter_async_context(trio.open_nursery())
        stack.callback(background.cancel_scope.cancel)
        await background.start(cluster.run, service.forget)
        dispatcher = Dispatcher(
            config=config,
            service=service,
            plugins=plugins,
            audit=audit,
            approvals=Approvals(clock, config.scheduler.approval_ttl_s),
            subscriptions=Subscriptions(background, service),
            metrics=metrics,
        )
        if run_scheduler and config.scheduler.enabled:
            await background.start(scheduler.run, config.scheduler.interval_s)
        metrics_port = None
        if config.metrics is not None:
            metrics_port = await background.start(metrics.serve, config.metrics.host, config.metrics.port)
            background.start_soon(metrics.refresh_keys, service)
        yield Broker(
            config, plugins, store, backends, audit, service, dispatcher, scheduler, metrics, metrics_port
        )


async def serve_broker(
    config: Config,
    *,
    handle_signals: bool = False,
    extra_plugins: Sequence[object] = (),
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker on its listeners until shut down (see broker.server.serve)."""
    async with open_broker(config, extra_plugins=extra_plugins, clock=clock) as broker:
        await serve(config, broker.dispatcher, handle_signals=handle_signals, task_status=task_status)
