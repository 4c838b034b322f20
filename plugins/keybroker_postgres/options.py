"""``[plugins.postgres]``: parsing, defaults, and a DSN kept out of sight.

Pure apart from reading the DSN file or variable the options name: a mapping
in, a :class:`PostgresOptions` out. The DSN may hold a password, so it is
kept in a :class:`Dsn` whose ``repr`` shows only where it points, and every
message that could echo server text goes through :meth:`Dsn.redact`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from broker.config import check_options
from broker.errors import InvalidArgument

__all__ = ["DEFAULTS", "Dsn", "PostgresOptions", "parse_options"]

#: Defaults of every option but the DSN, as documented in docs/cluster.md.
DEFAULTS: Final[Mapping[str, float]] = {
    # A broker serves most requests from its cache; the pool carries cache
    # misses, lease renewals and changes, so a few connections suffice and
    # 20 brokers stay below PostgreSQL's default max_connections = 100.
    "pool_min": 1,
    "pool_max": 4,
    # libpq counts whole seconds and treats anything below 2 as 2.
    "connect_timeout_s": 5,
    # Server-side bound on one statement, lock waits included.
    "statement_timeout_s": 10.0,
    # Client-side bound on one store call end to end (waiting for a
    # connection, connecting, every statement, the commit). It is what turns
    # a frozen server, whose kernel still acknowledges packets, into
    # `unavailable` rather than a hang.
    "call_timeout_s": 30.0,
    # How often a broker that is not the scheduler leader tries to become
    # it, and how often the leader checks that its session is alive.
    "leader_retry_s": 2.0,
}

_OPTIONS: Final = frozenset({"dsn", "dsn_file", "dsn_env", *DEFAULTS})
_SECRET_PARAMS: Final = ("password",)


@final
class Dsn:
    """A libpq connection string that never shows its password.

    Args:
        conninfo: the connection string or URI, as the operator wrote it.

    Raises:
        InvalidArgument: it is not a valid libpq connection string (the
            message does not repeat it).
    """

    __slots__ = ("_conninfo", "_params")

    def __init__(self, conninfo: str) -> None:
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError:
            raise InvalidArgument("config: plugins.postgres dsn is not a valid connection string") from None
        self._conninfo = conninfo
        self._params: dict[str, Any] = dict(params)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values in the DSN (its password), for redaction."""
        return tuple(str(self._params[p]) for p in _SECRET_PARAMS if self._params.get(p))

    def param(self, name: str) -> str | None:
        """The libpq parameter ``name`` as the DSN sets it, or None."""
        value = self._params.get(name)
        return None if value is None else str(value)

    def conninfo(self, **defaults: Any) -> str:
        """The connection string, with ``defaults`` added where the DSN does not set them.

        ``options`` is the exception: server settings given in the DSN come
        after the defaults, so they win.
        """
        extra = {k: v for k, v in defaults.items() if v is not None and k not in self._params}
        if "options" in defaults and "options" in self._params:
            extra["options"] = f"{defaults['options']} {self._params['options']}"
        return make_conninfo(self._conninfo, **extra)

    def redact(self, text: str) -> str:
        """``text`` with every secret of the DSN replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def where(self) -> str:
        """Host, port and database, for messages and reprs (never the password)."""
        host = self.param("host") or self.param("hostaddr") or "(default host)"
        port = self.param("port") or "(default port)"
        dbname = self.param("dbname") or "(default database)"
        return f"{host}:{port}/{dbname}"

    def __repr__(self) -> str:
        return f"Dsn({self.where()!r})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """The ``[plugins.postgres]`` table, checked, with defaults filled in."""

    dsn: Dsn = field(repr=False)
    pool_min: int = int(DEFAULTS["pool_min"])
    pool_max: int = int(DEFAULTS["pool_max"])
    connect_timeout_s: int = int(DEFAULTS["connect_timeout_s"])
    statement_timeout_s: float = DEFAULTS["statement_timeout_s"]
    call_timeout_s: float = DEFAULTS["call_timeout_s"]
    leader_retry_s: float = DEFAULTS["leader_retry_s"]


def _read_dsn(options: Mapping[str, Any], base: Path) -> str:
    given = [name for name in ("dsn", "dsn_file", "dsn_env") if name in options]
    if len(given) != 1:
        raise InvalidArgument("config: [plugins.postgres] needs exactly one of dsn, dsn_file, dsn_env")
    source = given[0]
    value = options[source]
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"config: plugins.postgres.{source} must be a non-empty string")
    if source == "dsn":
        return value
    if source == "dsn_env":
        found = os.environ.get(value)
        if not found:
            raise InvalidArgument(f"config: environment variable {value} (plugins.postgres.dsn_env) is unset")
        return found
    path = base / value
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidArgument(f"config: plugins.postgres.dsn_file {path} cannot be read: {reason}") from None
    # One line; editors add a final newline that is not part of the DSN.
    dsn = text.strip()
    if not dsn:
        raise InvalidArgument(f"config: plugins.postgres.dsn_file {path} is empty")
    return dsn


def _number(options: Mapping[str, Any], name: str, *, integer: bool, minimum: float) -> Any:
    value = options.get(name, DEFAULTS[name])
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if wrong_type or value < minimum:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(f"config: plugins.postgres.{name} must be {kind} >= {minimum:g}")
    return int(value) if integer else float(value)


def parse_options(options: Mapping[str, Any], *, base: Path | None = None) -> PostgresOptions:
    """Check ``[plugins.postgres]`` and read the DSN it names.

    Args:
        options: the raw table (``Config.section("postgres")``).
        base: what a relative ``dsn_file`` is relative to (default: the
            working directory).

    Returns:
        The options with every default filled in.

    Raises:
        InvalidArgument: an unknown option, a value of the wrong type or out
            of range, no DSN or more than one source for it. Messages never
            include the DSN.
    """
    check_options(options, _OPTIONS, "[plugins.postgres]")
    parsed = PostgresOptions(
        dsn=Dsn(_read_dsn(options, base or Path.cwd())),
        pool_min=_number(options, "pool_min", integer=True, minimum=0),
        pool_max=_number(options, "pool_max", integer=True, minimum=1),
        connect_timeout_s=_number(options, "connect_timeout_s", integer=True, minimum=2),
        statement_timeout_s=_number(options, "statement_timeout_s", integer=False, minimum=0.001),
        call_timeout_s=_number(options, "call_timeout_s", integer=False, minimum=0.001),
        leader_retry_s=_number(options, "leader_retry_s", integer=False, minimum=0.05),
    )
    if parsed.pool_min > parsed.pool_max:
        raise InvalidArgument("config: plugins.postgres.pool_min must not exceed pool_max")
    return parsed
