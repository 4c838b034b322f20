"""The sidecar documentation's examples, run for real.

docs/examples/app-policy.toml is loaded as the broker's configuration (with
this test's uid standing in for the application's), and the Python and
Node.js client examples run against it as that application.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.app import open_broker, serve_broker
from broker.config import Config, parse_config
from broker.server import ServerInfo
from tests.conftest import Caller, require
from tests.integration.test_cli import kb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
NODE_MODULES = ROOT / "tests" / "interop" / "node_modules"


def policy_config(data_dir: Path) -> Config:
    """app-policy.toml, with this process's uid as the application ``myapp``."""
    table: dict[str, Any] = tomllib.loads((EXAMPLES / "app-policy.toml").read_text())
    assert table["principals"] == {"uid:990": "myapp"}
    table.pop("passphrase_file")  # a systemd credential in production
    table["principals"] = {f"uid:{os.getuid()}": "myapp"}
    # This uid is also the broker's owner here; in production the owner is
    # the keybroker user. Keep the test's principal a plain application.
    table["plugins"]["rbac"]["owner_admin"] = False
    return parse_config(table, data_dir=data_dir, base=EXAMPLES)


@pytest.fixture
async def sidecar(short_tmp: Path, owner: str, nursery: trio.Nursery) -> ServerInfo:
    data_dir = short_tmp / "data"
    # The operator's part: create the application's keys as admin.
    async with open_broker(parse_config({}, data_dir=data_dir)) as admin_broker:
        admin = Caller(admin_broker, owner)
        await admin("key.create", name="myapp/records", type="aes256-gcm")
        await admin("key.create", name="myapp/webhooks", type="hmac-sha256")
        await admin("key.create", name="other/secret", type="aes256-gcm")
    info: ServerInfo = await nursery.start(serve_broker, policy_config(data_dir))
    return info


async def test_policy_grants_the_app_its_keys_only(sidecar: ServerInfo) -> None:
    sock = sidecar.socket_path
    status = (await kb("status", "--json", socket=sock)).json()
    assert status["whoami"] == {"principal": "myapp", "roles": ["app"]}
    assert (await kb("encrypt", "--key", "myapp/records", socket=sock, stdin=b"x")).code == 0
    for refused in (
        await kb("encrypt", "--key", "other/secret", socket=sock, stdin=b"x"),
        await kb("key", "create", "myapp/new", "--type", "aes256-gcm", socket=sock),
        await kb("key", "rotate", "myapp/records", socket=sock),
    ):
        assert refused.code == 1 and refused.err.startswith("keybroker: permission_denied: ")


async def test_python_client_example(sidecar: ServerInfo) -> None:
    env = {**os.environ, "KEYBROKER_SOCKET": str(sidecar.socket_path)}
    with trio.fail_after(60):
        proc = await trio.run_process([sys.executable, str(EXAMPLES / "client.py")], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "connected as myapp" in out and "refused: permission_denied" in out


async def test_node_client_example(sidecar: ServerInfo) -> None:
    node = shutil.which("node")
    require(node is not None, "node (Node.js)")
    require((NODE_MODULES / "msgpack5rpc").is_dir(), "msgpack5rpc (npm install --prefix tests/interop)")
    assert node is not None
    env = {**os.environ, "KEYBROKER_SOCKET": str(sidecar.socket_path), "NODE_PATH": str(NODE_MODULES)}
    with trio.fail_after(60):
        proc = await trio.run_process([node, str(EXAMPLES / "client.js")], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "connected as myapp" in out and "round trip: 4111 1111 1111 1111" in out
    assert "refused: not_found" in out
