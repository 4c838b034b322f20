"""The ``keybroker`` client verbs: keys, encrypt/decrypt, datakey, sign/verify, mac, status.

Every verb talks to a running broker through :class:`broker.client.Client`,
over its Unix socket (``--socket``, else ``$KEYBROKER_SOCKET``, else
``./data/keybroker.sock``) or over mutual TLS (``--tls-host`` and friends).
Output is a human table by default; ``--json`` prints one JSON document with
binary fields in base64, for scripts.

Exit codes (scripts rely on them):

* 0 -- done (``verify`` / ``verify-mac``: the signature or MAC is valid);
* 1 -- the broker refused: any protocol error except ``unavailable``, and a
  ``verify`` / ``verify-mac`` that found the signature or MAC invalid;
* 2 -- usage error: bad options, an input file that cannot be read or an
  output file that cannot be written;
* 3 -- the broker cannot be reached, the connection broke, or it answered
  ``unavailable``.

Errors are one line on stderr: ``keybroker: <code>: <message>``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import os
import ssl
import stat
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from .client import Client, ConnectionLost, client_ssl_context
from .errors import BrokerError, InvalidArgument
from .progress import ProgressBar
from .stream import DEFAULT_SEGMENT_SIZE, decrypt_file, encrypt_file
from .stream import MAGIC as STREAM_MAGIC

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "add_client_commands",
    "add_connection_options",
    "default_socket",
]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3

SOCKET_ENV: Final = "KEYBROKER_SOCKET"
# Stream segment size when --segment-size is not given (tests use tiny ones).
SEGMENT_SIZE_ENV: Final = "KEYBROKER_STREAM_SEGMENT_SIZE"
DEFAULT_SOCKET: Final = Path("data") / "keybroker.sock"
DEFAULT_TLS_PORT: Final = 7443
# key.list's own default page size; the CLI walks the pages.
_PAGE: Final = 100

EXIT_CODES_HELP: Final = """\
exit codes:
  0  done (verify, verify-mac: valid)
  1  the broker refused (a protocol error; verify, verify-mac: invalid)
  2  usage error (bad options, unreadable input, unwritable output)
  3  cannot connect, connection lost, or the broker is unavailable
"""

Handler = Callable[[Client, argparse.Namespace], int]


class UsageError(Exception):
    """A bad command line or a local file problem: exit 2, nothing sent."""


class _Unreachable(Exception):
    """The broker cannot be reached: exit 3."""


def default_socket() -> Path:
    """``$KEYBROKER_SOCKET``, else ``./data/keybroker.sock`` (where ``serve --data-dir ./data`` listens)."""
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else DEFAULT_SOCKET


# -- output --------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` with every bytes field as base64 text, ready for :func:`json.dumps`."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:  # a closed pipe, a full disk behind a redirect
        raise UsageError(f"cannot write to stdout: {exc.strerror or exc}") from None


def _print(text: str) -> None:
    _write_stdout((text + "\n").encode())


def _print_json(value: Any) -> None:
    _print(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _when(ts: Any) -> str:
    """An integer Unix time as ISO 8601 UTC; ``-`` for nil."""
    if not isinstance(ts, int):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int) or seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _max_uses(value: Any) -> str:
    # 0 means no limit (signing and MAC keys); absent on an old broker.
    if value == 0:
        return "unlimited"
    return "-" if value is None else str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _key_id(raw: Any) -> str:
    if isinstance(raw, bytes) and len(raw) == 16:
        return str(uuid.UUID(bytes=raw))
    return "-"


def _format_metadata(meta: dict[str, Any]) -> str:
    """One key's metadata as a field/value listing followed by its versions."""
    labels = meta.get("labels") or {}
    fields = [
        ("name", str(meta.get("name"))),
        ("id", _key_id(meta.get("id"))),
        ("type", str(meta.get("type"))),
        ("state", str(meta.get("state"))),
        ("protection", str(meta.get("protection"))),
        ("classification", str(meta.get("classification"))),
        ("primary version", str(meta.get("primary_version"))),
        ("min decrypt version", str(meta.get("min_decrypt_version"))),
        ("rotation period", _duration(meta.get("rotation_period_s"))),
        ("max uses/version", _max_uses(meta.get("max_uses_per_version"))),
        ("next rotation", _when(meta.get("next_rotation_at"))),
        ("exportable", "yes" if meta.get("exportable") else "no"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"),
        ("created", _when(meta.get("created_at"))),
        ("updated", _when(meta.get("updated_at"))),
    ]
    if meta.get("destroy_at") is not None:
        fields.append(("destroy at", _when(meta.get("destroy_at"))))
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]
    versions = [
        [str(v.get("version")), str(v.get("state")), _when(v.get("created_at")), str(v.get("uses"))]
        for v in meta.get("versions") or []
    ]
    if versions:
        lines += ["", _table(versions, ["VERSION", "STATE", "CREATED", "USES"])]
    return "\n".join(lines)


def _show_metadata(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    if args.json:
        _print_json(meta)
    else:
        _print(_format_metadata(meta))
    return EXIT_OK


# -- input and output files ----------------------------------------------------


def _pick(option: str | None, positional: str | None, what: str) -> str | None:
    """The one of ``--in FILE`` / positional IN given; both is a usage error."""
    if option is not None and positional is not None:
        raise UsageError(f"give the {what} file either as --{what} or as a positional argument, not both")
    return option if option is not None else positional


def _in_out(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Input and output paths from ``[IN [OUT]]``, ``--in`` and ``--out``.

    With ``--in FILE`` a single positional names the output
    (``decrypt --in sealed.bin plain.txt``).
    """
    in_pos, out_pos = args.in_file, args.out_file
    if args.in_ is not None and in_pos is not None and out_pos is None and args.out is None:
        in_pos, out_pos = None, in_pos
    return _pick(args.in_, in_pos, "in"), _pick(args.out, out_pos, "out")


def _read_input(path: str | None) -> bytes:
    """The bytes of ``path``, or of stdin for None or ``-``."""
    try:
        if path is None or path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path or 'stdin'}: {exc.strerror or exc}") from None


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not valid base64") from None


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} is not valid hex") from None


class _Output:
    """Where binary output goes: stdout, or a file replaced atomically.

    The file's temporary sibling is created (mode 0600: it may receive
    plaintext) before anything is sent to the broker, so an unwritable
    destination is a usage error rather than a use of the key whose result
    is lost; a failed call leaves an existing file untouched.
    """

    def __init__(self, path: str | None) -> None:
        self.path = None if path in (None, "-") else Path(str(path))
        self._tmp: IO[bytes] | None = None
        if self.path is None or self._special():
            return
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._tmp = os.fdopen(fd, "wb")
        self._tmp_name = name

    def _special(self) -> bool:
        # /dev/null, a FIFO, a terminal: write in place, never rename over it.
        assert self.path is not None
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return False
        return not stat.S_ISREG(mode)

    @property
    def to_stdout(self) -> bool:
        return self.path is None

    def commit(self, data: bytes) -> None:
        if self.path is None:
            _write_stdout(data)
            return
        try:
            if self._tmp is None:
                with self.path.open("wb") as fh:
                    fh.write(data)
                return
            with self._tmp as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(self._tmp_name, self.path)
            self._tmp = None
        except OSError as exc:
            self.abort()
            raise UsageError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_name)


def _aad(args: argparse.Namespace) -> bytes | None:
    if args.aad is not None:
        return str(args.aad).encode()
    if args.aad_file is not None:
        return _read_file(args.aad_file, "aad file")
    return None


# -- connection ----------------------------------------------------------------


def _open_client(args: argparse.Namespace) -> Client:
    """A client for the options given; it connects on its first call."""
    if args.tls_host is None:
        if any(v is not None for v in (args.tls_cert, args.tls_key, args.tls_ca)):
            raise UsageError("--tls-cert/--tls-key/--tls-ca need --tls-host")
        return Client(args.socket or default_socket(), timeout=args.timeout)
    if args.tls_ca is None or args.tls_cert is None:
        raise UsageError("a TLS connection needs --tls-ca and a client certificate (--tls-cert)")
    try:
        ctx = client_ssl_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    return Client(
        host=args.tls_host,
        port=args.tls_port,
        ssl_context=ctx,
        server_hostname=args.tls_server_name,
        timeout=args.timeout,
    )


def _where(args: argparse.Namespace) -> str:
    if args.tls_host is not None:
        return f"{args.tls_host}:{args.tls_port}"
    return str(args.socket or default_socket())


def _fail(code: str, message: str) -> None:
    print(f"keybroker: {code}: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    """Run the verb's handler and turn every failure into its exit code."""
    handler: Handler = args.handler
    for name, default in _OPTION_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        client = _open_client(args)
        with client:
            try:
                return handler(client, args)
            except (ConnectionLost, TimeoutError, ssl.SSLError) as exc:
                message = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError) or "waiting for the reply" in message:
                    message += " (the broker may have carried it out: check before repeating a change)"
                raise _Unreachable(message) from None
            except OSError as exc:
                # Local files are read and written through helpers that raise
                # UsageError, so an OSError here comes from the connection.
                raise _Unreachable(f"cannot connect to {_where(args)}: {exc.strerror or exc}") from None
    except UsageError as exc:
        _fail("usage", str(exc))
        return EXIT_USAGE
    except _Unreachable as exc:
        _fail("unavailable", str(exc))
        return EXIT_UNAVAILABLE
    except BrokerError as exc:
        message = exc.message
        if exc.details:
            message += " " + json.dumps(_jsonable(exc.details), sort_keys=True)
        _fail(exc.code, message)
        return EXIT_UNAVAILABLE if exc.code == "unavailable" else EXIT_REFUSED


# -- key management ------------------------------------------------------------


def _labels(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--label wants KEY=VALUE, not {pair!r}")
        labels[name] = value
    return labels


def _wait(text: str) -> float:
    """A positive, finite number of seconds to wait."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _seconds(text: str) -> int:
    """A duration: plain seconds, or a number with s, m, h, d or w (``90d``)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    scale = units.get(text[-1:].lower(), 1) if text else 1
    digits = text[:-1] if text[-1:].lower() in units else text
    try:
        value = int(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 12h, 90d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value * scale


def _key_create(client: Client, args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {
        "protection": args.protection,
        "classification": args.classification,
        "rotation_period_s": args.rotation_period,
        "max_uses_per_version": args.max_uses,
        "labels": _labels(args.label),
    }
    if args.pre_active:
        opts["activate"] = False
    if args.exportable:
        opts["exportable"] = True
    return _show_metadata(args, client.key_create(args.name, args.type, **opts))


def _key_get(client: Client, args: argparse.Namespace) -> int:
    return _show_metadata(args, client.key_get(args.name))


def _list_keys(client: Client, prefix: str | None, state: str | None) -> Iterator[dict[str, Any]]:
    """Every key matching, walking key.list's pages."""
    cursor: str | None = None
    while True:
        page = client.key_list(prefix=prefix, state=state, limit=_PAGE, cursor=cursor)
        yield from page["keys"]
        cursor = page.get("cursor")
        if cursor is None:
            return


def _key_list(client: Client, args: argparse.Namespace) -> int:
    if args.limit is not None or args.cursor is not None:
        # One page, with the cursor for the next: a script pages itself.
        page = client.key_list(prefix=args.prefix, state=args.state, limit=args.limit, cursor=args.cursor)
        keys, cursor = list(page["keys"]), page.get("cursor")
    else:
        keys, cursor = list(_list_keys(client, args.prefix, args.state)), None
    if args.json:
        _print_json({"keys": keys, "cursor": cursor})
        return EXIT_OK
    rows = [
        [
            str(k.get("name")),
            str(k.get("type")),
            str(k.get("state")),
            str(k.get("primary_version")),
            str(k.get("protection")),
            str(k.get("classification")),
            _when(k.get("next_rotation_at")),
        ]
        for k in keys
    ]
    _print(_table(rows, ["NAME", "TYPE", "STATE", "VERSION", "PROTECTION", "CLASS", "NEXT ROTATION"]))
    if cursor is not None:
        _print(f"(more: --cursor {cursor})")
    return EXIT_OK


def _key_update(client: Client, args: argparse.Namespace) -> int:
    labels = {} if args.clear_labels else _labels(args.label)
    if args.clear_labels and args.label:
        raise UsageError("give --label or --clear-labels, not both")
    meta = client.key_update(
        args.name,
        rotation_period_s=args.rotation_period,
        max_uses_per_version=args.max_uses,
        min_decrypt_version=args.min_decrypt_version,
        labels=labels,
    )
    return _show_metadata(args, meta)


def _lifecycle(method: str) -> Handler:
    """A handler for a lifecycle verb that takes only the key name."""

    def handler(client: Client, args: argparse.Namespace) -> int:
        return _show_metadata(args, client.call(method, {"name": args.name}))

    return handler


def _key_compromise(client: Client, args: argparse.Namespace) -> int:
    return _show_metadata(args, client.key_compromise(args.name, version=args.version))


def _key_schedule_destroy(client: Client, args: argparse.Namespace) -> int:
    return _show_metadata(args, client.key_schedule_destroy(args.name, pending_days=args.pending_days))


def _key_approve(client: Client, args: argparse.Namespace) -> int:
    result = client.approve(args.request_id, name=args.key)
    if args.json:
        _print_json(result)
        return EXIT_OK
    params = ", ".join(f"{k} {v}" for k, v in sorted(result["params"].items()) if k != "name")
    _print(
        f"approved {result['op']} of {result['key']} ({params or 'no options'}), "
        f"requested by {result['requester']}: {result['approvals']} of {result['required']} approvals"
        + ("; done" if result["done"] else "")
    )
    return EXIT_OK


def _key_public(client: Client, args: argparse.Namespace) -> int:
    result = client.key_public(args.name, version=args.version)
    if args.json:
        _print_json(result)
    else:
        _write_stdout(str(result["pem"]).encode())
    return EXIT_OK


# -- key use -------------------------------------------------------------------


def _is_path(path: str | None) -> bool:
    return path not in (None, "-")


def _stream_segment_size(args: argparse.Namespace) -> int:
    if args.segment_size is not None:
        return int(args.segment_size)
    from_env = os.environ.get(SEGMENT_SIZE_ENV)
    if from_env is None:
        return DEFAULT_SEGMENT_SIZE
    try:
        return int(from_env)
    except ValueError:
        raise UsageError(f"{SEGMENT_SIZE_ENV} must be a number of bytes") from None


def _file_errors(exc: OSError) -> UsageError | None:
    """A UsageError for a failure on a local file (it names one); None for the connection."""
    if exc.filename is None:
        return None
    return UsageError(f"{exc.filename}: {exc.strerror or exc}")


def _stream_encrypt(client: Client, args: argparse.Namespace, in_path: str, out_path: str) -> int:
    source, target = Path(in_path), Path(out_path)
    if not source.is_file():
        raise UsageError(f"cannot read {source}: not a readable file")
    bar = ProgressBar("encrypt")
    try:
        result = encrypt_file(
            client,
            args.key,
            source,
            target,
            segment_size=_stream_segment_size(args),
            aad=_aad(args) or b"",
            progress=bar,
        )
    except OSError as exc:
        raise _file_errors(exc) or exc from None
    except InvalidArgument as exc:
        if exc.details.get("field") == "segment_size":
            raise UsageError(exc.message) from None
        raise
    finally:
        bar.close()
    if args.json:
        _print_json({"key": args.key, "format": "stream", "out": str(target), **result})
    return EXIT_OK


def _stream_decrypt(client: Client, args: argparse.Namespace, in_path: str, out_path: str | None) -> int:
    if not _is_path(out_path):
        raise UsageError(
            "a stream decrypts into a file (give OUT): plaintext is released only once the whole "
            "stream has verified"
        )
    assert out_path is not None
    bar = ProgressBar("decrypt")
    try:
        result = decrypt_file(
            client,
            Path(in_path),
            Path(out_path),
            aad=_aad(args) or b"",
            allow_compromised=args.allow_compromised,
            progress=bar,
        )
    except OSError as exc:
        raise _file_errors(exc) or exc from None
    finally:
        bar.close()
    if args.json:
        _print_json({"format": "stream", "out": out_path, **result})
    return EXIT_OK


def _starts_a_stream(path: str | None) -> bool:
    if not _is_path(path):
        return False
    try:
        with open(str(path), "rb") as fh:
            return fh.read(len(STREAM_MAGIC)) == STREAM_MAGIC
    except OSError:
        return False  # reported by the envelope path's own read


def _encrypt(client: Client, args: argparse.Namespace) -> int:
    in_path, out_path = _in_out(args)
    if not args.envelope and _is_path(in_path) and _is_path(out_path):
        assert in_path is not None and out_path is not None
        return _stream_encrypt(client, args, in_path, out_path)
    if out_path in (None, "-") and not args.json and sys.stdout.isatty():
        raise UsageError("refusing to write a binary envelope to a terminal: give OUT, redirect, or --json")
    out = _Output(out_path)
    try:
        plaintext = _read_input(in_path)
        result = client.encrypt(args.key, plaintext, aad=_aad(args))
        return _emit(args, out, result, "ciphertext", {"key": args.key, "version": result["version"]})
    finally:
        out.abort()


def _decrypt(client: Client, args: argparse.Namespace) -> int:
    in_path, out_path = _in_out(args)
    if _starts_a_stream(in_path):
        assert in_path is not None
        return _stream_decrypt(client, args, in_path, out_path)
    out = _Output(out_path)
    try:
        ciphertext = _read_input(in_path)
        result = client.decrypt(
            ciphertext, aad=_aad(args), allow_compromised=True if args.allow_compromised else None
        )
        return _emit(args, out, result, "plaintext", {"key": result["key"], "version": result["version"]})
    finally:
        out.abort()


def _emit(
    args: argparse.Namespace, out: _Output, result: dict[str, Any], field: str, info: dict[str, Any]
) -> int:
    """Write ``result[field]`` to the output; with --json, describe it on stdout."""
    data = bytes(result[field])
    if args.json and out.to_stdout:
        _print_json({**info, field: data})
        return EXIT_OK
    out.commit(data)
    if args.json:
        _print_json({**info, "out": str(out.path), "bytes": len(data)})
    return EXIT_OK


def _datakey(client: Client, args: argparse.Namespace) -> int:
    result = client.datakey(
        args.key,
        count=args.count,
        bytes=args.bytes,
        plaintext=False if args.no_plaintext else None,
        aad=_aad(args),
    )
    if args.json:
        _print_json(result)
        return EXIT_OK
    lines = [f"version    {result['version']}"]
    for item in result["keys"]:
        lines.append(f"wrapped    {base64.b64encode(item['wrapped']).decode()}")
        if item.get("plaintext") is not None:
            lines.append(f"plaintext  {base64.b64encode(item['plaintext']).decode()}")
    _print("\n".join(lines))
    return EXIT_OK


def _message_or_digest(args: argparse.Namespace) -> dict[str, bytes]:
    if args.digest is not None:
        if args.in_ is not None or args.in_file is not None:
            raise UsageError("give a message (IN or stdin) or --digest, not both")
        return {"digest": _hex(args.digest, "--digest")}
    return {"message": _read_input(_pick(args.in_, args.in_file, "in"))}


def _signature_or_mac(args: argparse.Namespace, what: str) -> bytes:
    text, path = getattr(args, what), getattr(args, f"{what}_file")
    if (text is None) == (path is None):
        raise UsageError(f"give the {what} as --{what} BASE64 or --{what}-file FILE")
    return _b64(text, f"--{what}") if text is not None else _read_file(path, f"{what} file")


def _sign_like(args: argparse.Namespace, result: dict[str, Any], field: str, out: _Output) -> int:
    """A signature or MAC: raw bytes to --out FILE, else base64 on stdout."""
    data = bytes(result[field])
    if out.to_stdout:
        if args.json:
            _print_json({"key": args.key, "version": result["version"], field: data})
        else:
            _print(base64.b64encode(data).decode())
        return EXIT_OK
    out.commit(data)
    if args.json:
        _print_json({"key": args.key, "version": result["version"], "out": str(out.path), "bytes": len(data)})
    return EXIT_OK


def _sign(client: Client, args: argparse.Namespace) -> int:
    out = _Output(args.out)
    try:
        payload = _message_or_digest(args)
        return _sign_like(args, client.sign(args.key, **payload), "signature", out)
    finally:
        out.abort()


def _mac(client: Client, args: argparse.Namespace) -> int:
    out = _Output(args.out)
    try:
        message = _read_input(_pick(args.in_, args.in_file, "in"))
        return _sign_like(args, client.mac(args.key, message), "mac", out)
    finally:
        out.abort()


def _report_valid(args: argparse.Namespace, valid: bool) -> int:
    if args.json:
        _print_json({"valid": valid})
    else:
        _print("valid" if valid else "invalid")
    return EXIT_OK if valid else EXIT_REFUSED


def _verify(client: Client, args: argparse.Namespace) -> int:
    signature = _signature_or_mac(args, "signature")
    payload = _message_or_digest(args)
    result = client.verify(
        args.key,
        signature,
        version=args.version,
        allow_compromised=True if args.allow_compromised else None,
        **payload,
    )
    return _report_valid(args, bool(result["valid"]))


def _verify_mac(client: Client, args: argparse.Namespace) -> int:
    mac = _signature_or_mac(args, "mac")
    message = _read_input(_pick(args.in_, args.in_file, "in"))
    result = client.verify_mac(
        args.key,
        message,
        mac,
        version=args.version,
        allow_compromised=True if args.allow_compromised else None,
    )
    return _report_valid(args, bool(result["valid"]))


def _status(client: Client, args: argparse.Namespace) -> int:
    ping = client.ping()
    who = client.whoami()
    try:
        counts: Counter[str] | None = Counter(str(k.get("state")) for k in _list_keys(client, None, None))
    except BrokerError as exc:
        # A principal may use keys without listing them: status still answers.
        if exc.code != "permission_denied":
            raise
        counts = None
    keys: dict[str, Any] | None = None
    if counts is not None:
        keys = {"total": sum(counts.values()), "by_state": dict(sorted(counts.items()))}
    if args.json:
        _print_json({"broker": _where(args), "ping": ping, "whoami": who, "keys": keys})
        return EXIT_OK
    roles = ", ".join(who.get("roles") or []) or "none"
    if keys is None:
        key_line = "(not permitted to list keys)"
    else:
        by_state = ", ".join(f"{state} {n}" for state, n in keys["by_state"].items())
        key_line = f"{keys['total']}" + (f" ({by_state})" if by_state else "")
    rows = [
        ("broker", _where(args)),
        ("version", f"{ping.get('version')} (protocol {ping.get('protocol')})"),
        ("node", str(ping.get("node"))),
        ("principal", f"{who.get('principal')} (roles: {roles})"),
        ("keys", key_line),
    ]
    _print("\n".join(f"{name.ljust(9)}  {value}" for name, value in rows))
    return EXIT_OK


# -- argument parsing ----------------------------------------------------------


# Defaults of the connection and output options. The parsers themselves
# leave absent options unset (argparse.SUPPRESS): a subcommand's defaults
# would otherwise overwrite the same option given before the verb, on a
# parser that has them too (see add_connection_options).
_OPTION_DEFAULTS: Final[dict[str, Any]] = {
    "socket": None,
    "tls_host": None,
    "tls_port": DEFAULT_TLS_PORT,
    "tls_cert": None,
    "tls_key": None,
    "tls_ca": None,
    "tls_server_name": None,
    "timeout": 60.0,
    "json": False,
}


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection and output options (``--socket``, ``--tls-*``, ``--timeout``, ``--json``).

    Every client verb takes them after the verb. Calling this on the
    top-level ``keybroker`` parser as well lets them come before the verb
    (``keybroker --socket S key list``); a value given after the verb wins.
    """
    conn = parser.add_argument_group("connection")
    conn.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"broker Unix socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET})",
    )
    conn.add_argument("--tls-host", metavar="HOST", default=argparse.SUPPRESS,
                      help="connect over mutual TLS to HOST instead")
    conn.add_argument("--tls-port", metavar="PORT", type=int, default=argparse.SUPPRESS,
                      help=f"TLS port (default {DEFAULT_TLS_PORT})")
    conn.add_argument("--tls-cert", metavar="FILE", default=argparse.SUPPRESS,
                      help="client certificate (PEM; may hold the key too)")
    conn.add_argument("--tls-key", metavar="FILE", default=argparse.SUPPRESS,
                      help="client private key (PEM), if not in --tls-cert")
    conn.add_argument("--tls-ca", metavar="FILE", default=argparse.SUPPRESS,
                      help="CA certificate(s) that signed the broker's")
    conn.add_argument("--tls-server-name", metavar="NAME", default=argparse.SUPPRESS,
                      help="name to check the broker's certificate for (default: --tls-host)")
    conn.add_argument("--timeout", metavar="SECONDS", type=_wait, default=argparse.SUPPRESS,
                      help="give up waiting for the broker after this long (default 60)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="one JSON document on stdout, binary fields in base64")


def _common_options() -> argparse.ArgumentParser:
    """Connection and output options every client verb takes."""
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common)
    return common


def _io_options(parser: argparse.ArgumentParser, *, output: bool = True) -> None:
    parser.add_argument("in_file", nargs="?", metavar="IN", help="input file (default: stdin; - for stdin)")
    if output:
        parser.add_argument("out_file", nargs="?", metavar="OUT",
                            help="output file, replaced atomically (default: stdout)")
    parser.add_argument("--in", dest="in_", metavar="FILE", help="input file, as IN")
    if output:
        parser.add_argument("--out", metavar="FILE", help="output file, as OUT")


def _aad_options(parser: argparse.ArgumentParser) -> None:
    aad = parser.add_mutually_exclusive_group()
    aad.add_argument("--aad", metavar="TEXT", help="additional authenticated data (UTF-8 text)")
    aad.add_argument("--aad-file", metavar="FILE", help="additional authenticated data (raw bytes of FILE)")


def _verb(
    subparsers: Any, name: str, handler: Handler, common: argparse.ArgumentParser, help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        parents=[common],
        help=help_text,
        description=help_text[:1].upper() + help_text[1:] + ".",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=_run, handler=handler)
    return parser


def _key_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="key name")


def add_client_commands(subparsers: Any) -> None:
    """Add the client verbs (``key``, ``encrypt``, ... ``status``) to ``keybroker``'s subparsers."""
    common = _common_options()

    key = subparsers.add_parser("key", help="create, inspect and manage keys",
                                description="Create, inspect and manage keys.")
    verbs = key.add_subparsers(dest="key_command", required=True, metavar="VERB")

    create = _verb(verbs, "create", _key_create, common, "create a key (active unless --pre-active)")
    _key_name(create)
    create.add_argument("--type", required=True,
                        help="aes256-gcm, hmac-sha256, ed25519, ecdsa-p256 or rsa-3072")
    create.add_argument("--protection", help="software (default) or hsm")
    create.add_argument("--classification", help="public, internal (default), confidential or critical")
    create.add_argument("--rotation-period", type=_seconds, metavar="DURATION",
                        help="rotate on schedule: seconds, or 12h, 90d, 1w")
    create.add_argument("--max-uses", type=int, metavar="N", help="rotate after N uses per version")
    create.add_argument("--pre-active", action="store_true", help="create it pre-active (activate later)")
    create.add_argument("--exportable", action="store_true", help="allow the key material to be exported")
    create.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")

    _key_name(_verb(verbs, "get", _key_get, common, "show a key's metadata and versions"))

    listing = _verb(verbs, "list", _key_list, common, "list keys (every page unless --limit or --cursor)")
    listing.add_argument("--prefix", help="only names starting with this")
    listing.add_argument("--state", help="only keys in this state")
    listing.add_argument("--limit", type=int, metavar="N", help="one page of at most N keys")
    listing.add_argument("--cursor", help="the page after this cursor")

    _key_name(_verb(verbs, "rotate", _lifecycle("key.rotate"), common, "add a new primary version"))

    update = _verb(verbs, "update", _key_update, common, "change a key's rotation, usage limit or labels")
    _key_name(update)
    update.add_argument("--rotation-period", type=_seconds, metavar="DURATION",
                        help="seconds, or 12h, 90d, 1w; 0 for none")
    update.add_argument("--max-uses", type=int, metavar="N", help="rotate after N uses per version")
    update.add_argument("--min-decrypt-version", type=int, metavar="V",
                        help="refuse to decrypt with versions below V")
    update.add_argument("--label", action="append", metavar="KEY=VALUE",
                        help="a label (repeatable; replaces every label)")
    update.add_argument("--clear-labels", action="store_true", help="remove every label")

    for name, method, text in (
        ("activate", "key.activate", "activate a pre-active key"),
        ("deactivate", "key.deactivate", "deactivate a key (decrypt and verify only)"),
        ("disable", "key.disable", "disable an active key (metadata reads only)"),
        ("enable", "key.enable", "enable a disabled key again"),
        ("cancel-destroy", "key.cancel_destroy", "cancel a scheduled destruction"),
    ):
        _key_name(_verb(verbs, name, _lifecycle(method), common, text))

    compromise = _verb(verbs, "compromise", _key_compromise, common,
                       "mark a key (or one version) compromised")
    _key_name(compromise)
    compromise.add_argument("--version", type=int, metavar="V", help="only this version")

    destroy = _verb(verbs, "schedule-destroy", _key_schedule_destroy, common,
                    "schedule a key's destruction after a grace period")
    _key_name(destroy)
    destroy.add_argument(
        "--pending-days", type=int, metavar="DAYS", help="grace period, 7 to 30 (default 30)"
    )

    approve = _verb(verbs, "approve", _key_approve, common,
                    "approve a pending request (the request_id of approval_required)")
    approve.add_argument("request_id", metavar="REQUEST_ID")
    approve.add_argument("--key", metavar="NAME",
                         help="approve only if the request is for this key (recommended)")

    public = _verb(verbs, "public", _key_public, common, "print an asymmetric key's public key (PEM)")
    _key_name(public)
    public.add_argument("--version", type=int, metavar="V", help="this version (default: primary)")

    encrypt = _verb(
        subparsers,
        "encrypt",
        _encrypt,
        common,
        "encrypt file IN into a segmented stream OUT under one data key (any size, flat memory); "
        "with stdin, stdout or --envelope, into one envelope",
    )
    encrypt.add_argument("--key", required=True, metavar="KEY", help="key name")
    _io_options(encrypt)
    _aad_options(encrypt)
    encrypt.add_argument("--envelope", action="store_true",
                         help="one format-1 envelope (whole input in one request) instead of a stream")
    encrypt.add_argument("--segment-size", type=int, metavar="BYTES",
                         help=f"stream segment size (default {DEFAULT_SEGMENT_SIZE}, or ${SEGMENT_SIZE_ENV})")

    decrypt = _verb(subparsers, "decrypt", _decrypt, common,
                    "decrypt a stream (file IN to file OUT) or an envelope from IN (or stdin)")
    _io_options(decrypt)
    _aad_options(decrypt)
    decrypt.add_argument("--allow-compromised", action="store_true",
                         help="decrypt under a compromised key (audited as an alarm)")

    datakey = _verb(subparsers, "datakey", _datakey, common,
                    "generate data keys, wrapped under KEY (and in plaintext unless --no-plaintext)")
    datakey.add_argument("--key", required=True, metavar="KEY", help="key name")
    datakey.add_argument("--count", type=int, metavar="N", help="how many (default 1)")
    datakey.add_argument("--bytes", type=int, metavar="N", help="length of each, 1 to 1024 (default 32)")
    datakey.add_argument("--no-plaintext", action="store_true", help="return the wrapped keys only")
    _aad_options(datakey)

    sign = _verb(subparsers, "sign", _sign, common,
                 "sign IN (or stdin); the signature goes to --out FILE, else base64 on stdout")
    sign.add_argument("--key", required=True, metavar="KEY", help="key name")
    _io_options(sign, output=False)
    sign.add_argument("--digest", metavar="HEX", help="sign this SHA-256 digest instead of a message")
    sign.add_argument("--out", metavar="FILE", help="write the raw signature here")

    verify = _verb(subparsers, "verify", _verify, common,
                   "verify a signature over IN (or stdin); exit 0 valid, 1 invalid")
    verify.add_argument("--key", required=True, metavar="KEY", help="key name")
    _io_options(verify, output=False)
    verify.add_argument("--digest", metavar="HEX", help="verify over this SHA-256 digest instead")
    verify.add_argument("--signature", metavar="BASE64", help="the signature, base64")
    verify.add_argument("--signature-file", metavar="FILE", help="the signature, raw bytes")
    verify.add_argument("--version", type=int, metavar="V", help="check only this version")
    verify.add_argument("--allow-compromised", action="store_true", help="accept a compromised key (audited)")

    mac = _verb(subparsers, "mac", _mac, common,
                "MAC IN (or stdin); the MAC goes to --out FILE, else base64 on stdout")
    mac.add_argument("--key", required=True, metavar="KEY", help="key name")
    _io_options(mac, output=False)
    mac.add_argument("--out", metavar="FILE", help="write the raw MAC here")

    verify_mac = _verb(subparsers, "verify-mac", _verify_mac, common,
                       "verify a MAC over IN (or stdin); exit 0 valid, 1 invalid")
    verify_mac.add_argument("--key", required=True, metavar="KEY", help="key name")
    _io_options(verify_mac, output=False)
    verify_mac.add_argument("--mac", metavar="BASE64", help="the MAC, base64")
    verify_mac.add_argument("--mac-file", metavar="FILE", help="the MAC, raw bytes")
    verify_mac.add_argument("--version", type=int, metavar="V", help="check only this version")
    verify_mac.add_argument("--allow-compromised", action="store_true",
                            help="accept a compromised key (audited)")

    _verb(subparsers, "status", _status, common, "ping the broker: version, who you are, keys by state")
