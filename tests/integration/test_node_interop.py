"""A stock Node.js MessagePack-RPC client (msgpack5rpc) against a real broker.

tests/interop/interop.js creates a key, encrypts and decrypts with Buffers
(msgpack bin), opens a ciphertext the Python client made, sends pipelined
requests, and reports errors as the maps the protocol defines. Python opens
the Node-made ciphertext in turn: one envelope format, any language.
``tests/run.sh`` installs the npm packages (``npm install --prefix tests/interop``).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import trio

from broker.client import Client
from broker.server import ServerInfo
from tests.conftest import require

INTEROP_DIR = Path(__file__).resolve().parent.parent / "interop"


async def run_node(socket: Path, key: str, py_ciphertext: bytes) -> dict[str, Any]:
    node = shutil.which("node")
    require(node is not None, "node (Node.js)")
    require((INTEROP_DIR / "node_modules" / "msgpack5rpc").is_dir(),
            "msgpack5rpc (npm install --prefix tests/interop)")
    assert node is not None
    with trio.fail_after(60):
        proc = await trio.run_process(
            [node, str(INTEROP_DIR / "interop.js"), str(socket), key,
             base64.b64encode(py_ciphertext).decode()],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    return dict(json.loads(proc.stdout))


async def test_node_client_round_trip_and_errors(served: ServerInfo) -> None:
    with Client(served.socket_path) as client:
        await trio.to_thread.run_sync(lambda: client.key_create("interop/py", "aes256-gcm"))
        py_sealed = await trio.to_thread.run_sync(lambda: client.encrypt("interop/py", b"from python"))

        seen = await run_node(served.socket_path, "interop/node", py_sealed["ciphertext"])

        assert seen["ping"]["protocol"] == 1
        assert seen["created"]["name"] == "interop/node" and seen["created"]["state"] == "active"
        assert len(base64.b64decode(seen["created"]["id"])) == 16  # bin reached Node as a Buffer

        assert seen["encrypted"]["error"] is None and seen["encrypted"]["version"] == 1
        node_ciphertext = base64.b64decode(seen["encrypted"]["ciphertext"])
        assert node_ciphertext[:3] == b"KB\x01"
        assert seen["decrypted"] == {"error": None, "key": "interop/node",
                                     "plaintext": base64.b64encode(b"\x00\x01\x02\xff\xfehi").decode()}
        assert seen["from_python"] == {"error": None, "plaintext": base64.b64encode(b"from python").decode()}

        # Errors are maps with the protocol's code.
        assert seen["not_found"]["code"] == "not_found"
        assert seen["wrong_aad"] == {"code": "decryption_failed", "message": "decryption failed"}
        # A JS string travels as msgpack str; binary fields must be Buffers (bin).
        assert seen["str_plaintext"]["code"] == "invalid_argument"
        assert seen["str_plaintext"]["details"] == {"field": "plaintext"}

        assert seen["pipelined"] == [f"item {i}" for i in range(20)]

        # And Python opens what Node sealed, with the same aad.
        opened = await trio.to_thread.run_sync(lambda: client.decrypt(node_ciphertext, aad=b"order 42"))
        assert opened["plaintext"] == b"\x00\x01\x02\xff\xfehi" and opened["key"] == "interop/node"
