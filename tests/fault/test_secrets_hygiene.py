"""Secrets never leave: plaintext, aad, ciphertexts, data keys and the root
key appear in no log line, audit record or error message of a real broker
process logging at debug level; the process writes no core dumps."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import Client
from broker.config import parse_config
from broker.errors import BrokerError
from tests._broker_process import BrokerProcess, broker_process

PLAINTEXT = b"PLAINTEXT-4111-1111-1111-1111"
AAD = b"AAD-customer-0042"


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could leak into text: raw, hex, base64, repr."""
    return [secret, secret.hex().encode(), base64.b64encode(secret), repr(secret).encode()]


def leaks(haystack: bytes, secrets: list[bytes]) -> list[bytes]:
    return [s for secret in secrets for s in forms(secret) if s in haystack]


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[BrokerProcess]:
    with broker_process(short_tmp, "--log-level", "debug", "--log-format", "json") as running:
        yield running


def test_no_secret_in_logs_audit_errors_or_core(broker: BrokerProcess) -> None:
    proc, data, log_path = broker.proc, broker.data_dir, broker.log_path
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core

    messages: list[str] = []
    secrets = [PLAINTEXT, AAD]
    with Client(data / "keybroker.sock") as kb:
        kb.key_create("h/aes", "aes256-gcm")
        kb.key_create("h/mac", "hmac-sha256")
        kb.key_create("h/sig", "ed25519")
        sealed = kb.encrypt("h/aes", PLAINTEXT, aad=AAD)["ciphertext"]
        secrets.append(sealed)
        assert kb.decrypt(sealed, aad=AAD)["plaintext"] == PLAINTEXT
        for attempt in (
            lambda: kb.decrypt(sealed, aad=b"wrong"),
            lambda: kb.decrypt(sealed[:-1] + bytes([sealed[-1] ^ 1]), aad=AAD),
            lambda: kb.encrypt("h/sig", PLAINTEXT),
            lambda: kb.call("encrypt", {"key": "h/aes", "plaintext": PLAINTEXT, "extra": PLAINTEXT}),
            lambda: kb.call("encrypt", {"key": "h/aes", "plaintext": PLAINTEXT.decode()}),
        ):
            with pytest.raises(BrokerError) as info:
                attempt()
            messages.append(f"{info.value!r} {info.value} {info.value.details}")
        keys = kb.datakey("h/aes", count=3, aad=AAD)["keys"]
        secrets += [k["plaintext"] for k in keys] + [k["wrapped"] for k in keys]
        batch = kb.encrypt_batch("h/aes", [PLAINTEXT + bytes([i]) for i in range(5)], aad=AAD)
        secrets += batch["ciphertexts"]
        result = kb.decrypt_batch([*batch["ciphertexts"], b"junk"], aad=AAD)
        messages.append(repr(result["errors"]))
        kb.mac("h/mac", PLAINTEXT)
        kb.sign("h/sig", PLAINTEXT)

    root = (data / "root.key").read_bytes()[22:54]
    secrets.append(root)
    audit = (data / "audit" / "audit.jsonl").read_bytes()
    assert audit.count(b"\n") >= 10
    time.sleep(0.2)
    logs = log_path.read_bytes()
    assert b'"level":"debug"' in logs or b'"level":"info"' in logs
    assert leaks(logs, secrets) == []
    assert leaks(audit, secrets) == []
    # Error messages name the field and the rule, never a value.
    assert leaks("\n".join(messages).encode(), secrets) == []
    assert os.listdir(data / "audit") == ["audit.jsonl"]


def test_the_configs_repr_holds_no_plugin_secret(tmp_path: Path) -> None:
    password = "S3cret-" + os.urandom(6).hex()
    config = parse_config(
        {"store": "postgres", "plugins": {"postgres": {"dsn": f"postgresql://kb:{password}@db/kb"}}},
        data_dir=tmp_path,
    )
    assert config.section("postgres")["dsn"].endswith("@db/kb")  # still there to use
    assert password not in repr(config)
