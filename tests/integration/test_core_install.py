"""The broker on embedded defaults needs none of the optional extras.

`pip install .` (the README's run command) installs no PostgreSQL driver and
no PKCS#11 binding, yet every plugin is registered. A child process that
cannot import them must still start a broker, create a key and use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys

    OPTIONAL = {"psycopg", "psycopg_pool", "pkcs11"}

    class Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())

    import trio
    from broker.app import open_broker
    from broker.auth import Principal
    from broker.config import parse_config
    from broker.connection import RequestContext
    from broker.errors import InvalidArgument

    async def main(data_dir):
        ctx = RequestContext(Principal(name="uid:" + str(__import__("os").getuid()), transport="local"), 0)
        async with open_broker(parse_config({}, data_dir=data_dir)) as broker:
            call = broker.dispatcher.handle
            await call(ctx, "key.create", {"name": "core/k", "type": "aes256-gcm"})
            sealed = await call(ctx, "encrypt", {"key": "core/k", "plaintext": b"core"})
            opened = await call(ctx, "decrypt", {"ciphertext": sealed["ciphertext"]})
            assert opened["plaintext"] == b"core"
        for table in ({"store": "postgres", "plugins": {"postgres": {"dsn": "host=x"}}},
                      {"plugins": {"pkcs11": {"module": "/x.so", "token_label": "t", "pin_env": "P"}}}):
            try:
                async with open_broker(parse_config(table, data_dir=data_dir)):
                    pass
            except InvalidArgument as exc:
                print(exc.message)
            else:
                raise AssertionError("an optional plugin started without its extra")

    trio.run(main, sys.argv[1])
    print("ok")
    """
)


def test_embedded_defaults_run_without_the_optional_extras(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "P": "1234"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "ok"
    # Selecting an optional plugin without its extra names what to install.
    assert "pip install 'keybroker[postgres]'" in lines[0]
    assert "pip install 'keybroker[hsm]'" in lines[1]
