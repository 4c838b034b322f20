"""``keybroker encrypt|decrypt`` streams and ``keybroker backup create|restore`` as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from broker import backup_cli
from broker.__main__ import main
from broker.app import open_broker
from broker.client import Client
from broker.config import parse_config
from broker.errors import NotFound, Unavailable
from broker.server import ServerInfo
from broker.stream import SEGMENT_OVERHEAD, StreamHeader
from tests.conftest import Caller
from tests.distribution._fakes import rsa_key

SEG = 100


def _command() -> list[str]:
    script = shutil.which("keybroker", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "broker"]


KEYBROKER = _command()


@dataclass
class Result:
    code: int
    out: bytes
    err: str


async def kb(*args: str | Path, socket: Path | None = None, env: dict[str, str] | None = None) -> Result:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    if socket is not None:
        environ["KEYBROKER_SOCKET"] = str(socket)
    environ.update(env or {})
    with trio.fail_after(60):
        proc = await trio.run_process(
            [*KEYBROKER, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False, env=environ
        )
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header_len = len(StreamHeader(SEG, bytes(16), b"x").pack()) - 1 + int.from_bytes(blob[26:28], "big")
    step = SEG + SEGMENT_OVERHEAD
    body = blob[header_len:]
    return blob[:header_len], [body[i : i + step] for i in range(0, len(body), step)]


async def test_stream_round_trip_and_tampering(served: ServerInfo, short_tmp: Path) -> None:
    sock = served.socket_path
    with Client(sock) as client:
        await trio.to_thread.run_sync(client.key_create, "cli/stream", "aes256-gcm")
    small = {"KEYBROKER_STREAM_SEGMENT_SIZE": str(SEG)}
    plain, sealed, opened = short_tmp / "plain", short_tmp / "sealed", short_tmp / "opened"
    data = os.urandom(10 * SEG + 37)
    plain.write_bytes(data)
    done = await kb("encrypt", "--key", "cli/stream", "--aad", "ctx", plain, sealed, socket=sock, env=small)
    assert done.code == 0, done.err
    blob = sealed.read_bytes()
    header, segments = split(blob)
    assert blob[:4] == b"KBST" and len(segments) == 11
    back = await kb("decrypt", "--aad", "ctx", sealed, opened, "--json", socket=sock)
    assert back.code == 0, back.err
    assert opened.read_bytes() == data and json.loads(back.out)["bytes"] == len(data)
    opened.unlink()

    bad = short_tmp / "bad"
    tampered = {
        "truncated": header + b"".join(segments[:-1]),
        "swapped": header + segments[1] + segments[0] + b"".join(segments[2:]),
        "flipped": blob[:500] + bytes([blob[500] ^ 0x04]) + blob[501:],
    }
    for what, content in tampered.items():
        bad.write_bytes(content)
        result = await kb("decrypt", "--aad", "ctx", bad, opened, socket=sock)
        assert result.code == 1, (what, result.err)
        assert result.err.startswith("keybroker: decryption_failed"), (what, result.err)
        assert not opened.exists(), what
    wrong_aad = await kb("decrypt", "--aad", "other", sealed, opened, socket=sock)
    assert wrong_aad.code == 1 and not opened.exists()
    to_stdout = await kb("decrypt", "--aad", "ctx", sealed, socket=sock)
    assert to_stdout.code == 2 and to_stdout.out == b""

    empty, empty_sealed = short_tmp / "empty", short_tmp / "empty.kbst"
    empty.write_bytes(b"")
    flag = await kb(
        "encrypt", "--key", "cli/stream", "--segment-size", "64", empty, empty_sealed, socket=sock
    )
    assert flag.code == 0, flag.err
    assert (await kb("decrypt", empty_sealed, opened, socket=sock)).code == 0
    assert opened.read_bytes() == b""
    too_small = await kb("encrypt", "--key", "cli/stream", "--segment-size", "1", plain, sealed, socket=sock)
    assert too_small.code == 2
    missing = await kb("encrypt", "--key", "cli/stream", short_tmp / "absent", sealed, socket=sock)
    assert missing.code == 2


async def test_a_stream_under_a_compromised_key_opens_only_when_allowed(
    served: ServerInfo, short_tmp: Path
) -> None:
    sock = served.socket_path
    plain, sealed, opened = short_tmp / "plain", short_tmp / "sealed", short_tmp / "opened"
    plain.write_bytes(b"incident data" * 50)
    with Client(sock) as client:
        await trio.to_thread.run_sync(client.key_create, "cli/burnt", "aes256-gcm")
        assert (await kb("encrypt", "--key", "cli/burnt", plain, sealed, socket=sock)).code == 0
        await trio.to_thread.run_sync(client.key_compromise, "cli/burnt")
    refused = await kb("decrypt", sealed, opened, socket=sock)
    assert refused.code == 1 and refused.err.startswith("keybroker: invalid_state") and not opened.exists()
    allowed = await kb("decrypt", "--allow-compromised", sealed, opened, socket=sock)
    assert allowed.code == 0, allowed.err
    assert opened.read_bytes() == plain.read_bytes()


def key_uses(audit_log: Path) -> list[str]:
    """The ``datakey`` and ``decrypt`` records in the audit log, in order."""
    ops = [json.loads(line)["op"] for line in audit_log.read_bytes().splitlines()]
    return [op for op in ops if op in ("datakey", "decrypt")]


async def test_stream_to_an_unwritable_output_never_asks_the_broker(
    served: ServerInfo, short_tmp: Path
) -> None:
    sock = served.socket_path
    audit_log = short_tmp / "data" / "audit" / "audit.jsonl"
    with Client(sock) as client:
        await trio.to_thread.run_sync(client.key_create, "cli/out", "aes256-gcm")
    plain, sealed = short_tmp / "plain", short_tmp / "sealed"
    plain.write_bytes(b"x" * (3 * SEG))
    assert (await kb("encrypt", "--key", "cli/out", plain, sealed, socket=sock)).code == 0
    assert key_uses(audit_log) == ["datakey"]

    nowhere = short_tmp / "absent" / "out"
    for verb in (["encrypt", "--key", "cli/out", plain], ["decrypt", sealed]):
        result = await kb(*verb, nowhere, socket=sock)
        assert result.code == 2, result.err
        assert result.err == f"keybroker: usage: {nowhere}: No such file or directory\n"
    # Neither the data key of the encryption nor the opening of the stream's
    # data key was asked for: the key was not used for a result thrown away.
    assert key_uses(audit_log) == ["datakey"]
    assert not nowhere.parent.exists()


async def test_backup_cli_round_trip(short_tmp: Path, owner: str) -> None:
    old, new = short_tmp / "old", short_tmp / "new"
    async with open_broker(parse_config({}, data_dir=old), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="b/1", type="aes256-gcm")
        await admin("key.create", name="b/2", type="hmac-sha256")
        sealed = (await admin("encrypt", key="b/1", plaintext=b"restored"))["ciphertext"]
    secret = short_tmp / "pass"
    secret.write_text("a long backup passphrase\n")
    archive = short_tmp / "all.kbbk"
    made = await kb("backup", "create", "--data-dir", old, "--passphrase-file", secret, archive)
    assert made.code == 0, made.err
    assert "backed up 2 key(s)" in made.out.decode()
    restored = await kb("backup", "restore", "--data-dir", new, "--passphrase-file", secret, archive)
    assert restored.code == 0, restored.err
    assert "restored 2 key(s)" in restored.out.decode()
    async with open_broker(parse_config({}, data_dir=new), run_scheduler=False) as broker:
        opened = await Caller(broker, owner)("decrypt", ciphertext=sealed)
        assert opened["plaintext"] == b"restored"
    again = await kb("backup", "restore", "--data-dir", new, "--passphrase-file", secret, archive)
    assert again.code == 2 and "fresh" in again.err

    recipient = short_tmp / "recipient.pem"
    identity = short_tmp / "identity.pem"
    key = rsa_key()
    recipient.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    identity.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    one = short_tmp / "one.kbbk"
    made = await kb("backup", "create", "--data-dir", old, "--recipient", recipient, "--key", "b/2", one)
    assert made.code == 0, made.err
    blob = one.read_bytes()
    one.write_bytes(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:])
    refused = await kb("backup", "restore", "--data-dir", short_tmp / "t", "--identity", identity, one)
    assert refused.code == 1 and refused.err.startswith("keybroker: decryption_failed")
    assert not (short_tmp / "t").exists()
    one.write_bytes(blob)
    ok = await kb("backup", "restore", "--data-dir", short_tmp / "t", "--identity", identity, one)
    assert ok.code == 0 and "restored 1 key(s)" in ok.out.decode(), ok.err
    absent = await kb(
        "backup", "create", "--data-dir", short_tmp / "nope", "--passphrase-file", secret, archive
    )
    assert absent.code == 2


async def test_backup_cli_reports_a_missing_key_in_one_line(short_tmp: Path) -> None:
    async with open_broker(parse_config({}, data_dir=short_tmp / "d"), run_scheduler=False):
        pass
    secret = short_tmp / "pass"
    secret.write_text("a long backup passphrase\n")
    out = short_tmp / "out.kbbk"
    result = await kb(
        "backup", "create", "--data-dir", short_tmp / "d", "--passphrase-file", secret, "--key", "nosuch", out
    )
    assert (result.code, result.err) == (1, "keybroker: not_found: no key named 'nosuch'\n")
    assert not out.exists()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Unavailable("store is down"), 3),
        (NotFound("no key named 'x'"), 1),
        (PermissionError(13, "denied", "f"), 2),
    ],
)
def test_backup_cli_takes_a_lone_error_out_of_its_group(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
) -> None:
    async def fails(*args: object, **kwargs: object) -> None:
        raise ExceptionGroup("nursery", [ExceptionGroup("inner", [error])])

    monkeypatch.setattr(backup_cli, "run_backup_create", fails)
    assert main(_backup_create_argv(tmp_path)) == code
    assert capsys.readouterr().err.startswith("keybroker: ")


def test_backup_cli_keeps_the_traceback_of_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(*args: object, **kwargs: object) -> None:
        raise ExceptionGroup("nursery", [NotFound("x"), RuntimeError("a bug")])

    monkeypatch.setattr(backup_cli, "run_backup_create", fails)
    with pytest.raises(ExceptionGroup):
        main(_backup_create_argv(tmp_path))


def _backup_create_argv(directory: Path) -> list[str]:
    """``backup create`` of ``directory`` with a passphrase file written there."""
    secret = directory / "pass"
    secret.write_text("a long backup passphrase")
    return ["backup", "create", "--data-dir", str(directory), "--passphrase-file", str(secret),
            str(directory / "o")]


async def test_backup_cli_refuses_a_short_passphrase(short_tmp: Path) -> None:
    secret = short_tmp / "pass"
    secret.write_text("too short\n")
    out = short_tmp / "out.kbbk"
    result = await kb("backup", "create", "--data-dir", short_tmp, "--passphrase-file", secret, out)
    assert result.code == 2 and "at least 12 characters" in result.err, result.err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--recipient", "--identity"])
async def test_backup_cli_usage_errors(short_tmp: Path, flag: str) -> None:
    junk = short_tmp / "junk.pem"
    junk.write_text("not a key")
    verb = "create" if flag == "--recipient" else "restore"
    result = await kb("backup", verb, "--data-dir", short_tmp / "d", flag, junk, short_tmp / "archive")
    assert result.code == 2, result.err
