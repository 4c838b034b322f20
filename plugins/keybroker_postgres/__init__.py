"""Shared store: key metadata and wrapped material in one PostgreSQL database.

Selected with ``store = "postgres"``. Several brokers may share the
database: each change is one transaction with an optimistic revision check,
usage reservations are atomic across brokers, and a cluster feed
(:class:`PostgresCluster`: LISTEN/NOTIFY plus a session advisory lock)
tells each broker which keys others changed and which broker runs the
scheduler. Tables live in the schema ``keybroker`` and are created and
migrated by the first broker that starts. See docs/cluster.md.

Options, in the broker's config file (defaults shown)::

    [plugins.postgres]
    dsn = "host=db.internal dbname=keybroker user=keybroker"
    # or dsn_file = "/run/credentials/keybroker.service/pg-dsn"
    # or dsn_env = "KEYBROKER_PG_DSN"   (an environment variable's name)
    pool_min = 1                # connections opened at start and kept
    pool_max = 4                # connections (and worker threads) at most
    connect_timeout_s = 5       # connecting (whole seconds, >= 2)
    statement_timeout_s = 10.0  # the server cancels a longer statement
    call_timeout_s = 30.0       # one store call, end to end, client side
    leader_retry_s = 2.0        # how often a follower tries to become leader

The DSN is never logged nor put in a message or a repr; keep a password out
of the config file with ``dsn_file``, ``dsn_env`` or libpq's own
``~/.pgpass`` / ``PGPASSFILE``.

It uses only the public plugin API: :mod:`broker.keys`, :mod:`broker.store`,
:mod:`broker.cluster`, :mod:`broker.errors`, :class:`broker.config.Config`
and :data:`broker.hookspecs.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from broker.cluster import Cluster
from broker.config import Config
from broker.hookspecs import hookimpl
from broker.optional import lazy_attributes, require
from broker.store import Store

if TYPE_CHECKING:
    from .cluster import LEADER_LOCK as LEADER_LOCK
    from .cluster import PostgresCluster as PostgresCluster
    from .options import Dsn as Dsn
    from .options import PostgresOptions as PostgresOptions
    from .options import parse_options as parse_options
    from .pool import OutcomeUnknown as OutcomeUnknown
    from .schema import SCHEMA_VERSION as SCHEMA_VERSION
    from .schema import SchemaError as SchemaError
    from .store import NOTIFY_CHANNEL as NOTIFY_CHANNEL
    from .store import PostgresStore as PostgresStore

__all__ = [
    "LEADER_LOCK",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "Dsn",
    "OutcomeUnknown",
    "PostgresCluster",
    "PostgresOptions",
    "PostgresStore",
    "SchemaError",
    "kb_cluster",
    "kb_store",
    "parse_options",
]

# The value of ``store`` in the config that selects this plugin.
STORE_NAME = "postgres"

# psycopg is the optional `postgres` extra; the plugin is registered in every
# installation, so importing it must not need the driver. Everything that
# does loads on first use (module __getattr__) or when store = "postgres".
_LAZY: Final = {
    "LEADER_LOCK": "cluster",
    "PostgresCluster": "cluster",
    "Dsn": "options",
    "PostgresOptions": "options",
    "parse_options": "options",
    "OutcomeUnknown": "pool",
    "SCHEMA_VERSION": "schema",
    "SchemaError": "schema",
    "NOTIFY_CHANNEL": "store",
    "PostgresStore": "store",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def kb_store(config: Config) -> Store | None:
    """The PostgreSQL store when ``config.store`` is ``"postgres"``, else None.

    Raises:
        InvalidArgument: ``[plugins.postgres]`` has no DSN, an unknown or a
            mistyped option (messages never include the DSN).
    """
    if config.store != STORE_NAME:
        return None
    require("psycopg", needed_by=f'store = "{STORE_NAME}"', extra="postgres")
    from .options import parse_options  # noqa: PLC0415 - optional driver
    from .store import PostgresStore  # noqa: PLC0415

    return PostgresStore(parse_options(config.section(STORE_NAME)), node=config.node)


@hookimpl
def kb_cluster(config: Config, store: Store) -> Cluster | None:
    """The cluster feed of a :class:`PostgresStore`, else None (another plugin's store)."""
    if config.store != STORE_NAME:
        return None
    from .cluster import PostgresCluster  # noqa: PLC0415 - optional driver
    from .store import PostgresStore  # noqa: PLC0415

    if not isinstance(store, PostgresStore):
        return None
    return PostgresCluster(store)
