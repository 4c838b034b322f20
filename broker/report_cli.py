"""``keybroker report``: the edges of the compliance report (store, audit file, output).

The report itself is built by :mod:`broker.report` (pure) and rendered by
:mod:`broker.report_html`; this module gathers its inputs and writes the
result:

- keys come from the store the configuration names, opened through the
  plugins exactly as the broker opens it (``Plugins(config).store()``), so a
  PostgreSQL deployment is reported on as well as the embedded SQLite one;
- audit records are read straight from the primary file sink's
  ``<data_dir>/audit/audit.jsonl`` without taking the sink's lock, so a
  report can run next to a serving broker (a line still being written is
  counted as unreadable, never fatal);
- governance rules come from the configured policy plugins
  (``Plugins.validate(key, "create")``), the very rules the broker enforces.

``--check`` makes the exit status a deployment gate: 1 when any violation
exists, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from .audit import AUDIT_FILE_NAME, MAX_LINE_BYTES
from .config import Config, load_config
from .errors import InvalidArgument
from .keys import Key
from .plugins import Plugins
from .report import AuditStats, Governance, build_report
from .report_html import render_html
from .store import Store
from .stream import atomic_output

__all__ = [
    "DEFAULT_DAYS",
    "add_parser",
    "gather_report",
    "governance_of",
    "load_all_keys",
    "read_audit",
    "report_main",
]

#: Audit statistics cover this many days unless --since or --days says otherwise.
DEFAULT_DAYS: Final = 30
DAY: Final = 86_400
# Keys are read a page at a time so a large inventory never needs one huge query.
PAGE: Final = 1000

EXIT_OK: Final = 0
EXIT_VIOLATIONS: Final = 1


def governance_of(plugins: Plugins) -> Governance:
    """The configured policies' rules for a key: every rule its settings could break (the "create" check)."""

    def rules(key: Key) -> Sequence[str]:
        try:
            plugins.validate(key, "create")
        except InvalidArgument as exc:
            found = exc.details.get("rules")
            return [str(r) for r in found] if isinstance(found, list) else [exc.message]
        return ()

    return rules


async def load_all_keys(store: Store) -> list[Key]:
    """Every key in ``store``, by name, a page at a time."""
    keys: list[Key] = []
    after: str | None = None
    while True:
        page = await store.list_keys(prefix="", state=None, after=after, limit=PAGE)
        keys.extend(page)
        if len(page) < PAGE:
            return keys
        after = page[-1].name


def read_audit(path: Path, since: int, until: int) -> AuditStats | None:
    """Statistics over ``[since, until]`` from a JSON-lines audit file; None if there is no file.

    Blocking: run it in a worker thread from async code.

    Raises:
        OSError: the file exists but cannot be read.
    """
    stats = AuditStats(since=since, until=until)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        for line in fh:
            if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
                stats.unreadable += 1  # oversized, or a write still in flight
                continue
            try:
                record = json.loads(line)
            except ValueError:
                stats.unreadable += 1
                continue
            if isinstance(record, dict):
                stats.add(record)
            else:
                stats.unreadable += 1
    return stats


async def gather_report(
    config: Config,
    *,
    now: int,
    since: int,
    plugins: Plugins | None = None,
) -> dict[str, Any]:
    """Open the configured store, read the audit log, and build the report.

    Args:
        config: the broker configuration (store, governance, data directory).
        now: Unix time the report is made for (the end of the audit period).
        since: start of the audit period.
        plugins: already loaded plugins (default: load them from ``config``).

    Raises:
        StartupError: no plugin provides the configured store.
        Unavailable: the store cannot be read.
        OSError: the audit log exists but cannot be read.
    """
    plugins = plugins or Plugins(config)
    store = plugins.store()
    await store.open()
    try:
        keys = await load_all_keys(store)
    finally:
        await store.aclose()
    path = config.audit_dir / AUDIT_FILE_NAME
    stats = await trio.to_thread.run_sync(read_audit, path, since, now)
    return build_report(
        keys, stats, now=now, governance=governance_of(plugins), node=config.node, audit_source=str(path)
    )


def _since(args: argparse.Namespace, now: int) -> int:
    if args.since is None:
        if args.days < 1:
            raise InvalidArgument("--days must be at least 1")
        return now - int(args.days) * DAY
    try:
        parsed = datetime.fromisoformat(args.since)
    except ValueError:
        raise InvalidArgument(f"--since {args.since!r} is not an ISO 8601 date or time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # the report speaks UTC throughout
    return int(parsed.timestamp())


def _write(text: str, out: Path | None, stdout: TextIO) -> None:
    if out is None:
        stdout.write(text)
        return
    # Write-then-rename through a 0600 temporary file of a random name: a
    # pipeline never picks up half a report, the inventory is readable by
    # its owner only, and no planted link is followed.
    with atomic_output(out) as sink:
        sink.write(text.encode("utf-8"))


def report_main(
    args: argparse.Namespace,
    *,
    now: float | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``keybroker report`` for parsed ``args``; returns the exit status.

    Args:
        args: the parsed command line (see :func:`add_parser`).
        now: Unix time to report for (default: the clock).
        stdout, stderr: where the report and the --check summary go.

    Returns:
        0, or 1 with ``--check`` when the report lists any violation.

    Raises:
        BrokerError: bad --since, store unavailable (the CLI prints it and exits 1).
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    config = load_config(args.config, data_dir=args.data_dir)
    moment = int(time.time() if now is None else now)
    since = _since(args, moment)
    if since > moment:
        raise InvalidArgument("--since lies in the future")
    report = trio.run(lambda: gather_report(config, now=moment, since=since))
    if args.format == "html":
        text = render_html(report)
    else:
        text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    _write(text, args.out, stdout)
    if not args.check:
        return EXIT_OK
    summary = report["summary"]
    if summary["compliant"]:
        print(f"keybroker report: compliant ({summary['keys']} keys, no violations)", file=stderr)
        return EXIT_OK
    print(
        f"keybroker report: {summary['violations']} violation(s) in {summary['keys_in_violation']} key(s)",
        file=stderr,
    )
    for v in report["violations"]:
        version = "" if v["version"] is None else f" v{v['version']}"
        print(f"  {v['key']}{version}: {v['rule']}: {v['message']}", file=stderr)
    return EXIT_VIOLATIONS


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "report",
        help="key inventory and compliance report (JSON or one HTML page)",
        description="Report keys by state, classification and protection, the governance rules they "
        "break, and audit statistics over a period. Reads the store and the audit log directly; the "
        "broker may be running.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the broker's data directory")
    parser.add_argument("--config", type=Path, help="TOML configuration file (store, governance rules)")
    period = parser.add_mutually_exclusive_group()
    period.add_argument("--since", help="start of the audit period (ISO 8601; UTC unless it says otherwise)")
    period.add_argument(
        "--days", type=int, default=DEFAULT_DAYS,
        help=f"audit period: the last N days (default {DEFAULT_DAYS})",
    )
    parser.add_argument("--format", choices=["json", "html"], default="json")
    parser.add_argument("--out", type=Path, help="write the report here (default: standard output)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when any violation exists (a deployment gate)"
    )
    parser.set_defaults(func=report_main)
    return parser
