"""Rules from a TOML policy, enforced on real connections: the Unix socket
(SO_PEERCRED identity, mapped to a name) and mutual TLS (SPIFFE IDs)."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from broker.app import serve_broker
from broker.client import AsyncClient, client_ssl_context
from broker.config import Config, parse_config
from broker.errors import PermissionDenied
from broker.server import ServerInfo
from tests.integration.test_tls import issue_uri_cert

ADMIN = "spiffe://example.org/ops/admin"
BILLING = "spiffe://example.org/ns/prod/sa/billing"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def config(short_tmp: Path, ca: trustme.CA) -> Config:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(short_tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(short_tmp / "ca.pem"))
    table = {
        "tls": {"cert_file": "server.pem", "key_file": "server.pem", "client_ca_file": "ca.pem",
                "host": "127.0.0.1", "port": 0},
        # This test process's uid becomes the application "app1" ...
        "principals": {f"uid:{os.getuid()}": "app1"},
        "plugins": {"rbac": {
            # ... which therefore is not admin: the admin comes over mTLS.
            "owner_admin": False,
            "grants": [
                {"principals": ["app1"], "roles": ["app"], "keys": ["app1/*"]},
                {"principals": [ADMIN], "roles": ["admin"], "keys": ["*"]},
                {"principals": [BILLING], "roles": ["app"], "keys": ["billing/*"]},
            ],
            "deny": [{"principals": ["*"], "operations": ["key.schedule_destroy"], "keys": ["billing/*"]}],
        }},
    }
    return parse_config(table, data_dir=short_tmp / "data", base=short_tmp)


@pytest.fixture
async def server(config: Config, nursery: trio.Nursery) -> AsyncIterator[ServerInfo]:
    info: ServerInfo = await nursery.start(serve_broker, config)
    yield info
    info.shutdown.set()


def tls_context(directory: Path, ca: trustme.CA, uri: str) -> ssl.SSLContext:
    cert, key = issue_uri_cert(ca, uri)
    path = directory / f"{abs(hash(uri))}.pem"
    path.write_bytes(cert + key)
    return client_ssl_context(directory / "ca.pem", path)


async def test_rules_over_unix_and_mtls(server: ServerInfo, ca: trustme.CA, short_tmp: Path) -> None:
    assert server.tls_port
    admin_ctx = tls_context(short_tmp, ca, ADMIN)
    billing_ctx = tls_context(short_tmp, ca, BILLING)
    async with (
        AsyncClient(host="127.0.0.1", port=server.tls_port, ssl_context=admin_ctx,
                    server_hostname="localhost") as admin,
        AsyncClient(host="127.0.0.1", port=server.tls_port, ssl_context=billing_ctx,
                    server_hostname="localhost") as billing,
        AsyncClient(server.socket_path) as app1,
    ):
        assert (await admin.whoami())["principal"] == ADMIN
        assert (await app1.whoami()) == {"principal": "app1", "roles": ["app"]}
        for name in ("app1/k", "billing/k", "other/k"):
            await admin.key_create(name, "aes256-gcm")

        sealed = await app1.encrypt("app1/k", b"for app1")
        assert (await app1.decrypt(sealed["ciphertext"]))["plaintext"] == b"for app1"
        for attempt in (
            app1.encrypt("billing/k", b"x"),
            app1.key_rotate("app1/k"),
            app1.key_create("app1/new", "aes256-gcm"),
            app1.decrypt((await billing.encrypt("billing/k", b"b"))["ciphertext"]),
            billing.encrypt("app1/k", b"x"),
            billing.decrypt(sealed["ciphertext"]),
            billing.key_get("other/k"),
            admin.key_schedule_destroy("billing/k"),
        ):
            with pytest.raises(PermissionDenied):
                await attempt
        listed = await app1.key_list()
        assert [k["name"] for k in listed["keys"]] == ["app1/k"]
        assert (await admin.key_rotate("app1/k"))["primary_version"] == 2
        assert (await app1.encrypt("app1/k", b"y"))["version"] == 2
