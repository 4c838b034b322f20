"""Built-in store: key metadata and wrapped material in one SQLite database.

keybroker's embedded default (``store = "sqlite"``): the database is
``<data_dir>/keys.db``, in WAL mode. Changes are written on the event loop
and committed without a flush (``synchronous=NORMAL``); the store then
flushes the log on a native thread (:func:`broker.durable.fdatasync`), so a
change is on disk before the broker replies, as with ``synchronous=FULL``,
without a worker thread per write. ``secure_delete`` (erased material is
zeroed, not just unlinked) and foreign keys are on. The file is 0600 in a 0700
directory. Each state change is one transaction, so a crash at any instant
leaves every key as it was before or after a change, never in between. When
one machine is not enough, several brokers share a PostgreSQL store instead.

Options, in the broker's config file::

    [plugins.sqlite]
    busy_timeout_s = 5.0   # wait this long for another process's lock

This package is also the template for a third-party store: a module with one
``@hookimpl`` function returning a :class:`~broker.store.Store`, registered
through the ``keybroker`` entry-point group::

    [project.entry-points.keybroker]
    sqlite = "keybroker_sqlite"

and a test that subclasses
:class:`broker.testing.store_suite.StoreConformance` (see
tests/plugin_contract/test_sqlite_store.py). It uses only the public plugin
API: :mod:`broker.keys`, :mod:`broker.store`, :mod:`broker.errors`,
:mod:`broker.durable`, :class:`broker.config.Config` and
:data:`broker.hookspecs.hookimpl`.
"""

from __future__ import annotations

from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from broker.store import Store

from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .schema import SchemaError as SchemaError
from .store import DB_FILE_NAME as DB_FILE_NAME
from .store import DEFAULT_BUSY_TIMEOUT_S
from .store import SQLiteStore as SQLiteStore

__all__ = ["DB_FILE_NAME", "SCHEMA_VERSION", "SQLiteStore", "SchemaError", "kb_store"]

# The value of ``store`` in the config that selects this plugin.
STORE_NAME = "sqlite"
_OPTIONS = frozenset({"busy_timeout_s"})


@hookimpl
def kb_store(config: Config) -> Store | None:
    """The SQLite store when ``config.store`` is ``"sqlite"``, else None.

    Raises:
        InvalidArgument: ``[plugins.sqlite]`` has an unknown or mistyped option.
    """
    if config.store != STORE_NAME:
        return None
    options = config.section(STORE_NAME)
    check_options(options, _OPTIONS, "[plugins.sqlite]")
    timeout = options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise InvalidArgument("config: plugins.sqlite.busy_timeout_s must be a number of seconds >= 0")
    return SQLiteStore(config.data_dir / DB_FILE_NAME, busy_timeout_s=float(timeout))
