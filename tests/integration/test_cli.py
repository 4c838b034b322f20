"""The ``keybroker`` command line against a real broker on its Unix socket.

Each command runs as a subprocess (the installed console script when there is
one) through ``trio.run_process``, so the served broker's trio loop keeps
answering while the command waits for it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from broker.app import open_broker, serve_broker
from broker.client import Client
from broker.config import parse_config
from broker.errors import BrokerError
from broker.server import ServerInfo, serve
from tests.conftest import Caller
from tests.integration.test_tls import issue_uri_cert


def _command() -> list[str]:
    # The console script next to this interpreter is what users run; fall
    # back to the module when the package is on PYTHONPATH but not installed.
    script = shutil.which("keybroker", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "broker"]


KEYBROKER = _command()


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def kb(*args: str | Path, socket: Path | None = None, stdin: bytes = b"") -> Result:
    env = dict(os.environ)
    env.pop("KEYBROKER_SOCKET", None)
    if socket is not None:
        env["KEYBROKER_SOCKET"] = str(socket)
    with trio.fail_after(30):
        proc = await trio.run_process(
            [*KEYBROKER, *map(str, args)],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


@pytest.fixture
def sock(served: ServerInfo) -> Path:
    return served.socket_path


async def test_key_create_get_list_json(sock: Path) -> None:
    created = await kb("key", "create", "cli/a", "--type", "aes256-gcm", "--label", "team=x",
                       "--rotation-period", "90d", "--json", socket=sock)
    assert created.code == 0, created.err
    meta = created.json()
    assert meta["name"] == "cli/a" and meta["state"] == "active" and meta["labels"] == {"team": "x"}
    assert meta["rotation_period_s"] == 90 * 86400
    assert len(base64.b64decode(meta["id"])) == 16  # binary fields are base64
    await kb("key", "create", "cli/b", "--type", "ed25519", "--pre-active", socket=sock)

    got = await kb("key", "get", "cli/a", "--json", "--socket", sock)  # --socket beats the env
    assert got.code == 0 and got.json()["id"] == meta["id"]

    listed = await kb("key", "list", "--prefix", "cli/", "--json", socket=sock)
    assert listed.code == 0 and listed.json()["cursor"] is None
    states = {k["name"]: k["state"] for k in listed.json()["keys"]}
    assert states == {"cli/a": "active", "cli/b": "pre_active"}

    page = (await kb("key", "list", "--limit", "1", "--json", socket=sock)).json()
    assert [k["name"] for k in page["keys"]] == ["cli/a"] and page["cursor"] == "cli/a"

    table = await kb("key", "list", socket=sock)
    lines = table.out.decode().splitlines()
    assert lines[0].split()[:3] == ["NAME", "TYPE", "STATE"]
    assert lines[2].split()[:3] == ["cli/b", "ed25519", "pre_active"]

    activated = await kb("key", "activate", "cli/b", socket=sock)
    assert activated.code == 0 and "active" in activated.out.decode()
    public = await kb("key", "public", "cli/b", socket=sock)
    assert public.out.startswith(b"-----BEGIN PUBLIC KEY-----")


async def test_encrypt_decrypt_files_and_pipes(sock: Path, short_tmp: Path) -> None:
    assert (await kb("key", "create", "cli/enc", "--type", "aes256-gcm", socket=sock)).code == 0
    # Binary-safe: every byte value, including a NUL and no trailing newline.
    plaintext = bytes(range(256)) * 3
    (short_tmp / "plain.bin").write_bytes(plaintext)

    # Files: positional IN OUT (a segmented stream; --envelope for one envelope).
    sealed = await kb("encrypt", "--key", "cli/enc", "--aad", "ctx", short_tmp / "plain.bin",
                      short_tmp / "sealed.bin", socket=sock)
    assert sealed.code == 0 and sealed.out == b"", sealed.err
    assert (short_tmp / "sealed.bin").read_bytes()[:4] == b"KBST"
    one = await kb("encrypt", "--key", "cli/enc", "--envelope", short_tmp / "plain.bin",
                   short_tmp / "one.bin", socket=sock)
    assert one.code == 0 and (short_tmp / "one.bin").read_bytes()[:3] == b"KB\x01"
    (short_tmp / "one.bin").unlink()
    opened = await kb("decrypt", "--aad", "ctx", "--in", short_tmp / "sealed.bin",
                      "--out", short_tmp / "opened.bin", socket=sock)
    assert opened.code == 0, opened.err
    assert (short_tmp / "opened.bin").read_bytes() == plaintext
    assert (short_tmp / "opened.bin").stat().st_mode & 0o077 == 0  # plaintext files are 0600

    # Pipes: stdin to stdout, both ways.
    piped = await kb("encrypt", "--key", "cli/enc", socket=sock, stdin=plaintext)
    assert piped.code == 0 and piped.out[:3] == b"KB\x01"
    back = await kb("decrypt", socket=sock, stdin=piped.out)
    assert back.code == 0 and back.out == plaintext

    # The Python client opens what the CLI sealed: one envelope format.
    with Client(sock) as client:
        assert (await trio.to_thread.run_sync(client.decrypt, piped.out))["plaintext"] == plaintext

    # --json: binary fields in base64.
    doc = (await kb("encrypt", "--key", "cli/enc", "--json", socket=sock, stdin=b"hi")).json()
    assert doc["key"] == "cli/enc" and doc["version"] == 1
    plain = (await kb("decrypt", "--json", socket=sock, stdin=base64.b64decode(doc["ciphertext"]))).json()
    assert base64.b64decode(plain["plaintext"]) == b"hi" and plain["key"] == "cli/enc"

    # The wrong aad is refused: exit 1, the code on stderr, no output file left.
    wrong = await kb("decrypt", "--aad", "other", short_tmp / "sealed.bin", short_tmp / "nope.bin",
                     socket=sock)
    assert wrong.code == 1 and wrong.err.startswith("keybroker: decryption_failed: ")
    assert sorted(p.name for p in short_tmp.iterdir()) == ["data", "opened.bin", "plain.bin", "sealed.bin"]


async def test_datakey(sock: Path) -> None:
    await kb("key", "create", "cli/dk", "--type", "aes256-gcm", socket=sock)
    result = await kb("datakey", "--key", "cli/dk", "--count", "2", "--bytes", "16", "--json", socket=sock)
    doc = result.json()
    assert len(doc["keys"]) == 2
    first = doc["keys"][0]
    assert len(base64.b64decode(first["plaintext"])) == 16
    unwrapped = await kb("decrypt", socket=sock, stdin=base64.b64decode(first["wrapped"]))
    assert unwrapped.out == base64.b64decode(first["plaintext"])
    wrapped_only = (await kb("datakey", "--key", "cli/dk", "--no-plaintext", "--json", socket=sock)).json()
    assert "plaintext" not in wrapped_only["keys"][0]


async def test_sign_verify_and_mac_exit_codes(sock: Path, short_tmp: Path) -> None:
    await kb("key", "create", "cli/sig", "--type", "ecdsa-p256", socket=sock)
    message = short_tmp / "msg"
    message.write_bytes(b"release 1.2.3")

    signed = await kb("sign", "--key", "cli/sig", message, socket=sock)
    assert signed.code == 0
    signature = signed.out.decode().strip()
    base64.b64decode(signature, validate=True)
    ok = await kb("verify", "--key", "cli/sig", "--signature", signature, message, socket=sock)
    assert (ok.code, ok.out) == (0, b"valid\n")
    bad = await kb("verify", "--key", "cli/sig", "--signature", signature, socket=sock, stdin=b"tampered")
    assert (bad.code, bad.out) == (1, b"invalid\n")

    # A signature file holds raw bytes; --json reports validity too.
    await kb("sign", "--key", "cli/sig", "--out", short_tmp / "sig.der", socket=sock, stdin=b"x")
    doc = await kb("verify", "--key", "cli/sig", "--signature-file", short_tmp / "sig.der", "--json",
                   socket=sock, stdin=b"x")
    assert doc.code == 0 and doc.json() == {"valid": True}

    await kb("key", "create", "cli/mac", "--type", "hmac-sha256", socket=sock)
    mac = (await kb("mac", "--key", "cli/mac", socket=sock, stdin=b"m")).out.decode().strip()
    good = await kb("verify-mac", "--key", "cli/mac", "--mac", mac, socket=sock, stdin=b"m")
    assert good.code == 0
    forged = await kb("verify-mac", "--key", "cli/mac", "--mac", mac, socket=sock, stdin=b"n")
    assert forged.code == 1


async def test_refusals_exit_1_with_the_code(sock: Path) -> None:
    missing = await kb("key", "get", "cli/none", socket=sock)
    assert missing.code == 1 and missing.out == b""
    assert missing.err.startswith("keybroker: not_found: ")

    await kb("key", "create", "cli/off", "--type", "aes256-gcm", socket=sock)
    assert (await kb("key", "disable", "cli/off", socket=sock)).code == 0
    refused = await kb("encrypt", "--key", "cli/off", socket=sock, stdin=b"x")
    assert refused.code == 1 and refused.err.startswith("keybroker: invalid_state: ")
    taken = await kb("key", "create", "cli/off", "--type", "aes256-gcm", socket=sock)
    assert taken.code == 1 and "already_exists" in taken.err


async def test_no_broker_exits_3(short_tmp: Path) -> None:
    result = await kb("status", "--socket", short_tmp / "absent.sock")
    assert result.code == 3
    assert result.err.startswith("keybroker: unavailable: cannot connect to ")


async def test_a_reply_that_never_comes_says_the_change_may_have_happened(short_tmp: Path) -> None:
    path = short_tmp / "silent.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    try:
        result = await kb("key", "rotate", "cli/x", "--timeout", "0.3", socket=path)
    finally:
        listener.close()
    assert result.code == 3
    assert "may have carried it out" in result.err
    for bad in ("0", "-1", "nan"):
        assert (await kb("key", "get", "cli/x", "--timeout", bad, socket=path)).code == 2


async def test_usage_errors_exit_2(sock: Path, short_tmp: Path) -> None:
    assert (await kb("key", "create", "--type", "aes256-gcm", socket=sock)).code == 2  # no NAME
    assert (await kb("key", "frobnicate", "x", socket=sock)).code == 2
    both = await kb("encrypt", "--key", "k", "--in", "a", "--out", "b", "c", socket=sock)
    assert both.code == 2 and both.err.startswith("keybroker: usage: ")
    unreadable = await kb("encrypt", "--key", "k", short_tmp / "absent", socket=sock)
    assert unreadable.code == 2 and "cannot read" in unreadable.err
    bad_b64 = await kb("verify", "--key", "k", "--signature", "%%%", socket=sock, stdin=b"")
    assert bad_b64.code == 2


async def test_status(sock: Path, owner: str) -> None:
    await kb("key", "create", "cli/s1", "--type", "aes256-gcm", socket=sock)
    await kb("key", "create", "cli/s2", "--type", "aes256-gcm", socket=sock)
    await kb("key", "disable", "cli/s2", socket=sock)
    doc = await kb("status", "--json", socket=sock)
    assert doc.code == 0, doc.err
    status = doc.json()
    assert status["ping"]["protocol"] == 1
    assert status["whoami"] == {"principal": owner, "roles": ["admin"]}
    assert status["keys"] == {"total": 2, "by_state": {"active": 1, "disabled": 1}}
    human = (await kb("status", socket=sock)).out.decode()
    assert f"principal  {owner} (roles: admin)" in human
    assert "keys       2 (active 1, disabled 1)" in human


async def test_connection_options_before_or_after_the_verb(sock: Path, short_tmp: Path) -> None:
    # No KEYBROKER_SOCKET in the environment: only the option finds the broker.
    before = await kb("--socket", sock, "--json", "key", "create", "cli/g1", "--type", "aes256-gcm")
    assert before.code == 0, before.err
    assert before.json()["name"] == "cli/g1"
    after = await kb("key", "get", "cli/g1", "--socket", sock, "--json")
    assert after.code == 0 and after.json()["name"] == "cli/g1"
    # Given in both places, the one after the verb wins.
    nowhere = short_tmp / "nobody.sock"
    wins = await kb("--socket", nowhere, "key", "get", "cli/g1", "--socket", sock, "--json")
    assert wins.code == 0, wins.err
    assert (await kb("--socket", sock, "key", "get", "cli/g1", "--socket", nowhere)).code == 3


async def test_status_over_mutual_tls(short_tmp: Path, nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(short_tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(short_tmp / "ca.pem"))
    admin = "spiffe://example.org/ops/admin"
    cert_pem, key_pem = issue_uri_cert(ca, admin)
    (short_tmp / "client.pem").write_bytes(cert_pem)
    (short_tmp / "client.key").write_bytes(key_pem)
    table = {
        "tls": {"cert_file": "server.pem", "key_file": "server.pem", "client_ca_file": "ca.pem",
                "host": "127.0.0.1", "port": 0},
        "plugins": {"rbac": {"grants": [{"principals": [admin], "roles": ["admin"]}]}},
    }
    info: ServerInfo = await nursery.start(
        serve_broker, parse_config(table, data_dir=short_tmp / "data", base=short_tmp))
    tls = ["--tls-host", "127.0.0.1", "--tls-port", str(info.tls_port), "--tls-ca", short_tmp / "ca.pem",
           "--tls-cert", short_tmp / "client.pem", "--tls-key", short_tmp / "client.key"]
    status = await kb("status", "--json", *tls)
    assert status.code == 0, status.err
    assert status.json()["whoami"] == {"principal": admin, "roles": ["admin"]}
    created = await kb("key", "create", "tls/k", "--type", "aes256-gcm", *tls)
    assert created.code == 0, created.err
    # No client certificate: a usage error before anything is sent.
    assert (await kb("status", *tls[:6])).code == 2
    info.shutdown.set()


async def test_key_approve(make_config: Any, nursery: trio.Nursery, owner: str) -> None:
    grants = [{"principals": ["alice"], "roles": ["admin"], "keys": ["*"]}]
    governance = {"internal": {"destroy_approvals": 1}}
    config = make_config({"plugins": {"governance": governance, "rbac": {"grants": grants}}})
    async with open_broker(config) as broker:
        info: ServerInfo = await nursery.start(serve, config, broker.dispatcher)
        sock = info.socket_path
        alice = Caller(broker, "alice")
        await alice("key.create", name="cli/doomed", type="aes256-gcm")
        await alice("key.create", name="cli/other", type="aes256-gcm")
        with pytest.raises(BrokerError) as asked:
            await alice("key.schedule_destroy", name="cli/doomed", pending_days=7)
        request_id = asked.value.details["request_id"]
        # Named for another key: refused, and nothing is approved.
        wrong = await kb("key", "approve", request_id, "--key", "cli/other", socket=sock)
        assert wrong.code == 1 and wrong.err.startswith("keybroker: invalid_argument: ")
        done = await kb("key", "approve", request_id, "--key", "cli/doomed", socket=sock)
        assert done.code == 0, done.err
        assert done.out.decode() == (
            "approved key.schedule_destroy of cli/doomed (pending_days 7), requested by alice: "
            "1 of 1 approvals; done\n"
        )
        assert (await alice("key.get", name="cli/doomed"))["state"] == "destroy_pending"
        again = await kb("key", "approve", request_id, socket=sock)
        assert again.code == 1 and again.err.startswith("keybroker: not_found: ")
        info.shutdown.set()
