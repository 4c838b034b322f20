"""keybroker's pooled PKCS#11 path beside python-pkcs11 used directly (part of
``python -m bench peers``).

A SoftHSM2 token is initialized in a temporary directory
(``tests.hsm_fixtures.init_token``), and a broker process serves with
``[plugins.pkcs11]`` on it (a session pool of 4). An ``hsm``-protected
aes256-gcm key is created through the client, then, interleaved:

* keybroker ``encrypt`` of 32 bytes, one client (ops/s) and 8 AsyncClients
  (ops/s), and ``encrypt_batch`` of 1,000 x 32 bytes (items/s);
* python-pkcs11 in this process, one logged-in session, AES-GCM of 32 bytes
  in a loop (random 12-byte nonce, the format-1 header as GCM aad), on a
  token key object and on a session copy of it (what keybroker's backend
  seals with).

When SoftHSM2, python-pkcs11 or the pkcs11 plugin is missing the section
reports why instead of figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from bench.envelope import PREFIX_OLD
from bench.peers_common import interleaved, keybroker_process, rate
from bench.peers_service import CONCURRENT, concurrent_rate
from broker.client import Client

TOKEN_LABEL = "kb-peers"
KEY = "bench/hsm"
PIN_ENV = "KEYBROKER_BENCH_PKCS11_PIN"
POOL_SIZE = 4
HSM_BATCH = 1_000


def unavailable_reason() -> str | None:
    """Why the HSM section cannot run here, or None."""
    try:
        import keybroker_pkcs11  # noqa: F401, PLC0415
        import pkcs11  # noqa: F401, PLC0415

        from tests.hsm_fixtures import softhsm_module  # noqa: PLC0415
    except ImportError as exc:
        return f"pkcs11 backend not available ({exc.name} cannot be imported)"
    if softhsm_module() is None:
        return "pkcs11 backend not available (SoftHSM2 is not installed)"
    return None


def _direct(module: str, pin: str, seconds: float) -> dict[str, Callable[[], float]]:
    """Samplers of python-pkcs11 sealing 32 bytes in a loop on one session of this
    process, as a user would write it: a random 12-byte nonce per item and the
    format-1 header as GCM aad, on a token key object and on a session copy."""
    from keybroker_pkcs11._cryptoki import load_library  # noqa: PLC0415
    from pkcs11 import Attribute, KeyType, Mechanism  # noqa: PLC0415
    from pkcs11.mechanisms import GCMParams  # noqa: PLC0415

    library, _ = load_library(module)  # python-pkcs11's lib object, initialized for threads
    token = library.get_token(token_label=TOKEN_LABEL)
    payload = bytes(32)

    def loop(copy: bool) -> float:
        with token.open(rw=True, user_pin=pin) as session:
            key = session.generate_key(KeyType.AES, 256, label="bench-direct", store=True)
            if copy:
                key = key.copy({Attribute.TOKEN: False})
            encrypt = key.encrypt

            def seal_100() -> None:
                for _ in range(100):
                    nonce = os.urandom(12)
                    header = PREFIX_OLD + nonce
                    header + encrypt(
                        payload, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, header)
                    )

            return rate(seal_100, 100, seconds)

    return {
        "python-pkcs11|token object": lambda: loop(copy=False),
        "python-pkcs11|session copy": lambda: loop(copy=True),
    }


def measure(*, seconds: float, repeats: int) -> dict[str, Any]:
    """Medians and samples of every HSM figure, or ``{"unavailable": reason}``."""
    reason = unavailable_reason()
    if reason is not None:
        return {"unavailable": reason}
    from tests.hsm_fixtures import USER_PIN, init_token, softhsm_module  # noqa: PLC0415

    module = softhsm_module()
    assert module is not None
    directory = Path(tempfile.mkdtemp(prefix="kb-peers-hsm-", dir="/tmp"))
    saved = {name: os.environ.get(name) for name in ("SOFTHSM2_CONF", PIN_ENV)}
    try:
        conf = init_token(directory, TOKEN_LABEL)
        # Read by SoftHSM2 at C_Initialize, in the broker and in this process.
        os.environ["SOFTHSM2_CONF"] = str(conf)
        os.environ[PIN_ENV] = USER_PIN
        config = (
            "[plugins.pkcs11]\n"
            f'module = "{module}"\ntoken_label = "{TOKEN_LABEL}"\npin_env = "{PIN_ENV}"\n'
            f"pool_size = {POOL_SIZE}\n"
        )
        items = [os.urandom(32) for _ in range(HSM_BATCH)]
        payload = bytes(32)
        with keybroker_process(config) as socket_path, Client(socket_path) as kb:
            meta = kb.key_create(KEY, "aes256-gcm", protection="hsm")
            assert meta["protection"] == "hsm"
            samplers: dict[str, Callable[[], float]] = {
                "keybroker|encrypt x1": lambda: rate(lambda: kb.encrypt(KEY, payload), 1, seconds),
                "keybroker|encrypt x8": lambda: trio.run(
                    concurrent_rate, socket_path, "encrypt", CONCURRENT, seconds, KEY
                ),
                "keybroker|encrypt_batch 1000": lambda: rate(
                    lambda: kb.encrypt_batch(KEY, items), HSM_BATCH, seconds
                ),
                **_direct(module, USER_PIN, seconds),
            }
            medians, samples = interleaved(samplers, repeats)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "medians": medians,
        "samples": samples,
        "pool_size": POOL_SIZE,
        "batch_items": HSM_BATCH,
        "module": module,
    }
