"""The ``keybroker`` command line: serve, audit verify, and the client verbs."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .allocator import keep_freed_memory
from .app import serve_broker
from .audit import audit_verify_main
from .backup_cli import add_backup_commands
from .cli import add_client_commands, add_connection_options
from .config import load_config
from .errors import BrokerError, Unavailable, leaves
from .hardening import disable_core_dumps
from .logs import configure_logging
from .report_cli import add_parser as add_report_parser

__all__ = ["main"]

# Exit codes scripts rely on.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def startup_failure(exc: BaseException) -> BrokerError | None:
    """What to report when ``exc`` stopped the broker before it served; None for a bug.

    Start-up fails on a :class:`BrokerError` (a bad option in a plugin
    section, the root key passphrase, missing plugins) or an ``OSError`` (the
    data directory, the audit log or the socket held by another broker): on
    its own, or inside the exception groups trio's nurseries wrap errors in.
    Those are reported in one line like any configuration error. A group
    holding anything else is a bug and keeps its traceback.
    """
    found = list(leaves(exc))
    if not found or not all(isinstance(leaf, BrokerError | OSError) for leaf in found):
        return None
    first = found[0]
    if isinstance(first, BrokerError):
        return first
    assert isinstance(first, OSError)
    text = first.strerror or str(first)
    return Unavailable(f"{text}: {first.filename}" if first.filename is not None else text)


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data_dir, socket_path=args.socket)
    configure_logging(args.log_level, args.log_format)
    disable_core_dumps()
    keep_freed_memory()
    log = logging.getLogger("keybroker")
    serving = False

    async def run() -> None:
        nonlocal serving
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: serve_broker(config, handle_signals=True, task_status=task_status)
            )
            serving = True
            # What startup made (modules, plugins, configuration) lives as
            # long as the process: out of the collector's way, a full
            # collection scans only what serving made.
            gc.freeze()
            log.info(
                "keybroker %s serving on %s%s",
                __version__,
                info.socket_path,
                f" and TLS port {info.tls_port}" if info.tls_port else "",
            )

    try:
        trio.run(run)
    except (BaseExceptionGroup, BrokerError, OSError) as exc:
        failure = None if serving else startup_failure(exc)
        if failure is None:
            raise
        raise failure from None
    return EXIT_OK


def _audit_verify(args: argparse.Namespace) -> int:
    return audit_verify_main(args.data_dir, sys.stdout, args.expect_hash)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description="Key lifecycle management broker.")
    parser.add_argument("--version", action="version", version=f"keybroker {__version__}")
    # The client verbs' connection and output options may also come first:
    # keybroker --socket S --json key list
    add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--data-dir", type=Path, required=True, help="directory for keys, audit, socket")
    serve.add_argument("--socket", type=Path, help="Unix socket path (default DATA_DIR/keybroker.sock)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object a line"
    )
    serve.set_defaults(func=_serve)

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="prove the audit chain unbroken (exit 0 when intact)")
    verify.add_argument("--data-dir", type=Path, required=True)
    verify.add_argument(
        "--expect-hash",
        metavar="HASH",
        help="a 'last hash' printed before and kept elsewhere: fail unless the chain still holds it",
    )
    verify.set_defaults(func=_audit_verify)

    add_client_commands(commands)
    add_backup_commands(commands)
    add_report_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokerError as exc:
        print(f"keybroker: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
