"""Broker configuration: frozen dataclasses loaded from TOML, with defaults.

Every option and its default is documented in docs/configuration.md. Parsing
is pure (a mapping in, a :class:`Config` out) so it is tested without files.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

__all__ = [
    "AuditConfig",
    "Config",
    "Limits",
    "MetricsConfig",
    "SchedulerConfig",
    "TLSConfig",
    "check_options",
    "load_config",
    "parse_config",
]

# docs/protocol.md's defaults.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 100_000
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT_S = 300.0
# Bounds the memory one pipelining client can pin: beyond this many requests
# in flight, the reader stops reading and TCP pushes back.
DEFAULT_MAX_INFLIGHT = 128
# A client that starts a message must finish it within this time (slow-loris).
DEFAULT_MESSAGE_TIMEOUT_S = 30.0
# SIGTERM lets in-flight requests finish for this long before cancelling them.
DEFAULT_DRAIN_TIMEOUT_S = 10.0
# A TLS handshake is a few round trips: a peer that has not finished one in
# this long is refused, so unauthenticated peers cannot hold connections long.
DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0
# TLS handshakes under way at once; further TCP clients are refused until one
# ends, so unauthenticated peers never hold more than this many connections.
DEFAULT_MAX_TLS_HANDSHAKES = 64
# After a reply, a Unix-socket connection polls for the next request this long (broker.busypoll).
DEFAULT_BUSY_POLL_US = 50
# After a gathered group, the event loop stays awake this long for the next requests (broker.gather).
DEFAULT_GATHER_POLL_US = 200


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_inflight_per_connection: int = DEFAULT_MAX_INFLIGHT
    message_timeout_s: float = DEFAULT_MESSAGE_TIMEOUT_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    gather_poll_us: int = DEFAULT_GATHER_POLL_US
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    max_tls_handshakes: int = DEFAULT_MAX_TLS_HANDSHAKES


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TCP listener with TLS 1.3 and required client certificates."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path
    host: str = "127.0.0.1"
    port: int = 7443


@dataclass(frozen=True, slots=True)
class AuditConfig:
    # When the audit sink fails, refuse everything (fail closed), or keep
    # serving metadata reads only.
    fail_open_reads: bool = False
    # "changes": a key change waits for its "requested" record's fsync, and
    # alarms for theirs; every other record is written before its reply and
    # fsynced within sync_interval_s. "always": every record is fsynced
    # before its reply.
    sync: str = "changes"
    sync_interval_s: float = 0.01

    @property
    def staged_interval(self) -> float | None:
        """The audit log's background sync interval, or None when every record syncs at once."""
        return self.sync_interval_s if self.sync == "changes" else None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    enabled: bool = True
    # How often due rotations, activations and destructions are looked for.
    interval_s: float = 5.0
    # Pending approval requests lapse after this long.
    approval_ttl_s: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics over HTTP; loopback unless deliberately exposed."""

    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path
    socket_path: Path
    socket_mode: int = 0o660
    tls: TLSConfig | None = None
    limits: Limits = field(default_factory=Limits)
    audit: AuditConfig = field(default_factory=AuditConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metrics: MetricsConfig | None = None
    node: str = ""
    store: str = "sqlite"
    root: str = "file"
    passphrase_file: Path | None = None
    # Maps a transport identity ("uid:1000", a SPIFFE ID, a CN) to a name.
    principals: Mapping[str, str] = field(default_factory=dict)
    # Plugin sections, by plugin name: [plugins.rbac], [plugins.pkcs11], ...
    # Left out of repr: a section may hold a secret (an inline DSN's password).
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    disabled_plugins: tuple[str, ...] = ()

    def section(self, name: str) -> Mapping[str, Any]:
        """The raw ``[plugins.NAME]`` table (empty when absent)."""
        return self.plugins.get(name, {})

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"


def _take(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise InvalidArgument(f"config: {key} has the wrong type")
    return value


def check_options(table: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Refuse a table holding options other than ``allowed``: a misspelled
    option must stop the broker, never fall back to a default.

    Plugins check their ``[plugins.NAME]`` tables with it too.

    Raises:
        InvalidArgument: naming the unknown options and ``where`` they are.
    """
    unknown = sorted(str(name) for name in set(table) - set(allowed))
    if unknown:
        raise InvalidArgument(f"config: unknown option(s) in {where}: {', '.join(unknown)}")


# Limits that 0 turns off.
_MAY_BE_ZERO = frozenset({"busy_poll_us", "gather_poll_us"})


def _limits(table: Mapping[str, Any]) -> Limits:
    defaults = Limits()
    check_options(table, set(Limits.__dataclass_fields__), "[limits]")
    values: dict[str, Any] = {}
    for name in Limits.__dataclass_fields__:
        default = getattr(defaults, name)
        kind: type | tuple[type, ...] = (int, float) if isinstance(default, float) else int
        value = _take(table, name, kind, default)
        if isinstance(value, bool) or value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
            raise InvalidArgument(f"config: limits.{name} must be a positive number")
        values[name] = float(value) if isinstance(default, float) else value
    return Limits(**values)


def _tls(table: Mapping[str, Any], base: Path) -> TLSConfig:
    check_options(table, set(TLSConfig.__dataclass_fields__), "[tls]")
    try:
        return TLSConfig(
            cert_file=base / str(table["cert_file"]),
            key_file=base / str(table["key_file"]),
            client_ca_file=base / str(table["client_ca_file"]),
            host=_take(table, "host", str, "127.0.0.1"),
            port=_take(table, "port", int, 7443),
        )
    except KeyError as exc:
        raise InvalidArgument(f"config: [tls] needs {exc.args[0]}") from None


_TOP_LEVEL = {
    "data_dir",
    "socket",
    "socket_mode",
    "node",
    "store",
    "root",
    "passphrase_file",
    "limits",
    "tls",
    "audit",
    "scheduler",
    "metrics",
    "principals",
    "plugins",
    "disabled_plugins",
}


def parse_config(
    table: Mapping[str, Any],
    *,
    data_dir: Path | None = None,
    socket_path: Path | None = None,
    base: Path | None = None,
) -> Config:
    """Build a :class:`Config` from a parsed TOML table.

    Args:
        table: the TOML document as a mapping.
        data_dir / socket_path: command-line values, which win over the file.
        base: directory that relative paths in the file are relative to.

    Raises:
        InvalidArgument: on an unknown option or a value of the wrong type.
    """
    base = base or Path.cwd()
    check_options(table, _TOP_LEVEL, "the top level")
    raw_dir = data_dir or (base / str(table["data_dir"]) if "data_dir" in table else None)
    if raw_dir is None:
        raise InvalidArgument("config: a data directory is required (--data-dir or data_dir)")
    resolved_dir = Path(raw_dir).absolute()
    sock = socket_path or (base / str(table["socket"]) if "socket" in table else None)
    audit_table = _take(table, "audit", dict, {})
    check_options(audit_table, set(AuditConfig.__dataclass_fields__), "[audit]")
    audit = AuditConfig(
        fail_open_reads=bool(_take(audit_table, "fail_open_reads", bool, False)),
        sync=_take(audit_table, "sync", str, "changes"),
        sync_interval_s=float(_take(audit_table, "sync_interval_s", (int, float), 0.01)),
    )
    if audit.sync not in ("changes", "always"):
        raise InvalidArgument('config: [audit] sync must be "changes" or "always"')
    if not 0 < audit.sync_interval_s <= 10:
        raise InvalidArgument("config: [audit] sync_interval_s must be in (0, 10]")
    sched = _take(table, "scheduler", dict, {})
    check_options(sched, set(SchedulerConfig.__dataclass_fields__), "[scheduler]")
    scheduler = SchedulerConfig(
        enabled=bool(_take(sched, "enabled", bool, True)),
        interval_s=float(_take(sched, "interval_s", (int, float), 5.0)),
        approval_ttl_s=float(_take(sched, "approval_ttl_s", (int, float), 24 * 3600.0)),
    )
    if scheduler.interval_s <= 0 or scheduler.approval_ttl_s <= 0:
        raise InvalidArgument("config: scheduler intervals must be positive")
    metrics = None
    if "metrics" in table:
        metrics_table = _take(table, "metrics", dict, {})
        check_options(metrics_table, {"host", "port"}, "[metrics]")
        metrics = MetricsConfig(
            host=_take(metrics_table, "host", str, "127.0.0.1"), port=_take(metrics_table, "port", int, 9464)
        )
    principals = _take(table, "principals", dict, {})
    if not all(isinstance(v, str) for v in principals.values()):
        raise InvalidArgument("config: [principals] maps identities to names (strings)")
    plugins = _take(table, "plugins", dict, {})
    disabled = _take(table, "disabled_plugins", list, [])
    passphrase_file = _take(table, "passphrase_file", str, None)
    return Config(
        data_dir=resolved_dir,
        socket_path=Path(sock).absolute() if sock else resolved_dir / "keybroker.sock",
        socket_mode=_take(table, "socket_mode", int, 0o660),
        tls=_tls(table["tls"], base) if "tls" in table else None,
        limits=_limits(_take(table, "limits", dict, {})),
        audit=audit,
        scheduler=scheduler,
        metrics=metrics,
        node=_take(table, "node", str, "") or os.uname().nodename,
        store=_take(table, "store", str, "sqlite"),
        root=_take(table, "root", str, "file"),
        passphrase_file=base / passphrase_file if passphrase_file else None,
        principals=dict(principals),
        plugins={str(k): dict(v) for k, v in plugins.items()},
        disabled_plugins=tuple(str(d) for d in disabled),
    )


def load_config(
    path: Path | None, *, data_dir: Path | None = None, socket_path: Path | None = None
) -> Config:
    """Read a TOML config file (or none: embedded defaults) and parse it."""
    if path is None:
        return parse_config({}, data_dir=data_dir, socket_path=socket_path)
    with path.open("rb") as fh:
        table = tomllib.load(fh)
    return parse_config(table, data_dir=data_dir, socket_path=socket_path, base=path.parent.absolute())
