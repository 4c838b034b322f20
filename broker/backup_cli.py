"""``keybroker backup create|restore``: offline backups of a data directory.

Both verbs open the broker in-process (:func:`broker.app.open_broker`, no
listeners, no scheduler) over ``--data-dir`` and its ``--config``:

- ``create`` refuses while a broker serves the directory (two writers would
  interleave the audit chain); a serving broker is backed up over RPC with
  ``backup.create`` instead.
- ``restore`` is offline only, into a *fresh* data directory (absent or
  empty): the archive is verified whole first, the keys are restored into a
  temporary directory beside it, and that directory is renamed into place
  only when every key is in -- a failed restore leaves nothing behind. The
  new directory gets a new root key (sealed by ``KEYBROKER_PASSPHRASE`` when
  set, as ``serve`` would).

Each run is recorded in the data directory's audit log as principal
``offline:uid:N``. Exit codes follow the client verbs: 0 done, 1 refused
(a tampered archive, a key that exists), 2 usage (files, options), 3 the
store or root key is unavailable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .app import open_broker
from .backup import Passphrase, Recipient, collect_keys, create_backup, open_archive, restore_keys
from .config import Config, load_config
from .durable import sync_directory
from .errors import BrokerError, InvalidArgument, leaves
from .progress import ProgressBar
from .stream import atomic_output

__all__ = ["add_backup_commands", "run_backup_create", "run_backup_restore"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
MAX_SECRET_FILE = 64 * 1024


class UsageError(Exception):
    """Bad options or unusable files (exit 2)."""


def _principal() -> str:
    return f"offline:uid:{os.getuid()}"


def _read_passphrase(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"passphrase file {path} cannot be read: {reason}") from None
    # Editors and `echo` add a final newline that is not part of the passphrase.
    passphrase = text.removesuffix("\n").removesuffix("\r")
    if not passphrase:
        raise UsageError(f"passphrase file {path} is empty")
    return passphrase


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE:
        raise UsageError(f"{what} {path} is too large")
    return data


def _load_identity(path: Path) -> rsa.RSAPrivateKey:
    data = _read_small(path, "identity file")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"identity file {path} is not an unencrypted PEM private key") from None
    if not isinstance(private, rsa.RSAPrivateKey):
        raise UsageError(f"identity file {path} does not hold an RSA private key")
    return private


def _serving(config: Config) -> bool:
    """Whether a broker answers on the data directory's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(config.socket_path))
        except OSError:
            return False
    return True


async def run_backup_create(
    config: Config,
    protector: Recipient | Passphrase,
    out: Path,
    names: list[str] | None,
    *,
    progress: ProgressBar | None = None,
    extra_plugins: Sequence[object] = (),
) -> dict[str, Any]:
    """Back up ``config``'s keys (all, or ``names``) into the file ``out``.

    ``extra_plugins`` are registered as :func:`~broker.app.open_broker` would
    (an embedding application's custody plugins).

    Returns:
        ``{"keys", "by_reference", "bytes"}``.

    Raises:
        UsageError: the data directory is missing or being served.
        BrokerError: a named key is missing, the store is unavailable.
        OSError: ``out`` cannot be written.
    """
    if not config.data_dir.is_dir():
        raise UsageError(f"data directory {config.data_dir} does not exist")
    if _serving(config):
        raise UsageError(
            f"a broker is serving {config.data_dir}; stop it, or back up over RPC (backup.create)"
        )
    async with open_broker(config, run_scheduler=False, extra_plugins=extra_plugins) as broker:
        keys = await collect_keys(broker.service, names)
        with atomic_output(out) as sink:
            summary = await create_backup(
                broker.service, keys, protector, sink, node=config.node, progress=progress
            )
        await broker.audit.record(
            principal=_principal(),
            op="backup.create",
            outcome="allowed",
            details={
                "keys": summary.keys,
                "by_reference": len(summary.by_reference),
                "protector": "recipient" if isinstance(protector, Recipient) else "passphrase",
            },
        )
    return {"keys": summary.keys, "by_reference": list(summary.by_reference), "bytes": summary.archive_bytes}


def _check_fresh(data_dir: Path) -> None:
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise UsageError(f"{data_dir} is not empty: restore goes into a fresh data directory")


async def run_backup_restore(
    config: Config,
    archive_path: Path,
    unlock: rsa.RSAPrivateKey | str,
    *,
    progress: ProgressBar | None = None,
    extra_plugins: Sequence[object] = (),
) -> dict[str, Any]:
    """Restore an archive into the fresh data directory of ``config``.

    ``extra_plugins``: as for :func:`run_backup_create` (e.g. the HSM
    backend that keeps by-reference keys).

    Returns:
        ``{"restored": [names], "skipped": [names]}``.

    Raises:
        UsageError: the target is not fresh, or the archive cannot be read.
        DecryptionFailed: the archive is altered, truncated or the passphrase is wrong.
        BrokerError: the keys cannot be written.
    """
    target = config.data_dir
    _check_fresh(target)
    try:
        with archive_path.open("rb") as src:
            archive = await trio.to_thread.run_sync(open_archive, src, unlock)
    except OSError as exc:
        raise UsageError(f"archive {archive_path} cannot be read: {exc.strerror}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restoring-", dir=target.parent))
    try:
        staged = _with_data_dir(config, staging)
        async with open_broker(staged, run_scheduler=False, extra_plugins=extra_plugins) as broker:
            summary = await restore_keys(broker.service, archive, progress=progress)
            await broker.audit.record(
                principal=_principal(),
                op="backup.restore",
                outcome="allowed",
                details={
                    "keys": len(summary.restored),
                    "skipped": len(summary.skipped),
                    "archive_created_at": archive.created_at,
                },
            )
        _check_fresh(target)
        # rename(2) replaces an empty directory atomically; flushing the
        # parent keeps the new name through a power loss.
        os.replace(staging, target)
        sync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"restored": list(summary.restored), "skipped": list(summary.skipped)}


def _with_data_dir(config: Config, data_dir: Path) -> Config:
    socket_path = config.socket_path
    if socket_path.parent == config.data_dir:
        socket_path = data_dir / socket_path.name
    return replace(config, data_dir=data_dir, socket_path=socket_path)


# --- argparse ----------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, data_dir=args.data_dir)
    except OSError as exc:
        raise UsageError(f"config {args.config} cannot be read: {exc.strerror}") from None


def _create(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.recipient is not None:
        try:
            protector: Recipient | Passphrase = Recipient.from_pem(
                _read_small(args.recipient, "recipient key")
            )
        except InvalidArgument as exc:
            raise UsageError(f"--recipient {args.recipient}: {exc.message}") from None
    else:
        try:
            protector = Passphrase(_read_passphrase(args.passphrase_file))
        except InvalidArgument as exc:
            raise UsageError(f"--passphrase-file {args.passphrase_file}: {exc.message}") from None
    bar = ProgressBar("backup", unit="keys")
    try:
        names = args.key or None
        result = trio.run(lambda: run_backup_create(config, protector, args.out, names, progress=bar))
    finally:
        bar.close()
    note = ""
    if result["by_reference"]:
        note = (
            f"; {len(result['by_reference'])} HSM key(s) by reference only, their material stays in "
            f"the token: {', '.join(result['by_reference'])}"
        )
    print(f"backed up {result['keys']} key(s) to {args.out} ({result['bytes']:,} bytes){note}")
    return EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    config = _config(args)
    unlock: rsa.RSAPrivateKey | str = (
        _load_identity(args.identity) if args.identity is not None else _read_passphrase(args.passphrase_file)
    )
    bar = ProgressBar("restore", unit="keys")
    try:
        result = trio.run(lambda: run_backup_restore(config, args.archive, unlock, progress=bar))
    finally:
        bar.close()
    print(f"restored {len(result['restored'])} key(s) into {config.data_dir}")
    if result["skipped"]:
        print(
            f"skipped {len(result['skipped'])} HSM key(s) whose token is not configured here: "
            + ", ".join(result["skipped"])
        )
    return EXIT_OK


def _unwrapped(handler: Any, args: argparse.Namespace) -> int:
    """``handler(args)``, with a nursery's group around a lone BrokerError or OSError taken off.

    What open_broker's body raises reaches here inside trio's exception
    groups; the error alone is reported in one line with its exit code,
    anything else keeps its traceback.
    """
    try:
        return int(handler(args))
    except BaseExceptionGroup as group:
        found = list(leaves(group))
        if len(found) == 1 and isinstance(found[0], BrokerError | OSError):
            raise found[0] from None
        raise


def _guarded(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return _unwrapped(handler, args)
        except UsageError as exc:
            print(f"keybroker: usage: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokerError as exc:
            print(f"keybroker: {exc.code}: {exc.message}", file=sys.stderr)
            return EXIT_UNAVAILABLE if exc.code == "unavailable" else EXIT_REFUSED
        except OSError as exc:
            print(f"keybroker: usage: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE

    return run


def add_backup_commands(subparsers: Any) -> None:
    """Add ``backup create`` and ``backup restore`` to ``keybroker``'s subparsers."""
    backup = subparsers.add_parser("backup", help="offline backup and restore of a data directory")
    verbs = backup.add_subparsers(dest="backup_command", required=True)

    create = verbs.add_parser("create", help="write an encrypted, authenticated archive of the keys")
    create.add_argument("--data-dir", type=Path, required=True, help="the broker's data directory")
    create.add_argument("--config", type=Path, help="the broker's TOML configuration")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--recipient", type=Path, metavar="PEM", help="RSA-3072+ public key that may restore")
    who.add_argument("--passphrase-file", type=Path, metavar="F", help="file holding a passphrase (scrypt)")
    create.add_argument("--key", action="append", metavar="NAME", help="back up only this key (repeatable)")
    create.add_argument("out", type=Path, metavar="OUT", help="archive file to write")
    create.set_defaults(func=_guarded(_create))

    restore = verbs.add_parser("restore", help="restore an archive into a fresh data directory")
    restore.add_argument("--data-dir", type=Path, required=True, help="new (absent or empty) data directory")
    restore.add_argument("--config", type=Path, help="TOML configuration for the new directory")
    unlock = restore.add_mutually_exclusive_group(required=True)
    unlock.add_argument("--identity", type=Path, metavar="KEY.pem", help="the recipient's RSA private key")
    unlock.add_argument("--passphrase-file", type=Path, metavar="F", help="file holding the passphrase")
    restore.add_argument("archive", type=Path, metavar="IN", help="archive file to restore")
    restore.set_defaults(func=_guarded(_restore))
