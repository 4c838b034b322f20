"""A real SoftHSM2 token for the PKCS#11 tests, initialized in a temporary directory.

Import the fixture into a test module (``from tests.hsm_fixtures import
softhsm  # noqa: F401``). It is session-scoped on purpose: a PKCS#11 module
reads its configuration once, at C_Initialize, and a process initializes it
once, so every test in a pytest process shares one token (tests keep apart by
using fresh key ids and labels). ``SOFTHSM2_CONF`` is set for the process
before the module is first loaded.

When SoftHSM2 is missing the tests skip locally and fail in CI
(``KEYBROKER_REQUIRE_ALL=1``), through conftest's ``require``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "kb-test"
PIN_ENV = "KEYBROKER_TEST_PKCS11_PIN"
# Test-only secrets for a throwaway token.
USER_PIN = "1234-user"
SO_PIN = "5678-so"


def softhsm_module() -> str | None:
    """The SoftHSM2 module path, or None when SoftHSM2 is not installed."""
    if shutil.which("softhsm2-util") is None:
        return None
    return next((path for path in SOFTHSM_MODULE_CANDIDATES if os.path.exists(path)), None)


def pkcs11_importable() -> bool:
    try:
        import pkcs11  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def init_token(directory: Path, label: str = TOKEN_LABEL) -> Path:
    """Write softhsm2.conf under ``directory`` and initialize a token there; the conf path."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", USER_PIN],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )
    return conf


@dataclass(frozen=True)
class SoftToken:
    """The test token: where it lives and how to configure keybroker for it."""

    module: str
    label: str
    directory: Path
    conf: Path
    pin: str = field(repr=False)
    pin_env: str = PIN_ENV

    def section(self, **overrides: Any) -> dict[str, Any]:
        """A ``[plugins.pkcs11]`` table for this token (PIN from ``pin_env``)."""
        return {"module": self.module, "token_label": self.label, "pin_env": self.pin_env, **overrides}


# Each test module that imports the fixture registers its own copy of it, and
# pytest caches a session-scoped fixture per definition: without this shared
# state, a second module would initialize a second token that the already
# initialized module never sees. Counted so the last user cleans up.
_shared: SoftToken | None = None
_users = 0
_previous_conf: str | None = None


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftToken]:
    """One initialized SoftHSM2 token for the whole test session."""
    global _shared, _users, _previous_conf  # noqa: PLW0603 - one token per process, see above
    module = softhsm_module()
    require(module is not None, "SoftHSM2 (softhsm2-util and libsofthsm2.so)")
    require(pkcs11_importable(), "python-pkcs11 (pip install -e '.[hsm]')")
    assert module is not None
    if _shared is None:
        directory = Path(tempfile.mkdtemp(prefix="kb-hsm-", dir="/tmp"))
        conf = init_token(directory)
        _previous_conf = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        os.environ[PIN_ENV] = USER_PIN
        _shared = SoftToken(module=module, label=TOKEN_LABEL, directory=directory, conf=conf, pin=USER_PIN)
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            os.environ.pop(PIN_ENV, None)
            if _previous_conf is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = _previous_conf
            shutil.rmtree(_shared.directory, ignore_errors=True)
            # The module stays initialized on this token for the process's
            # life; a later token in the same process could not be used.
            _shared = None


_LIST_OBJECTS = r"""
import json, sys
import pkcs11
from pkcs11 import Attribute
module, label, pin = sys.argv[1:4]
wanted = [bytes.fromhex(h) for h in sys.argv[4:]]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(user_pin=pin) as session:
    found = {h.hex(): [] for h in wanted}
    for obj in session.get_objects():
        try:
            oid = bytes(obj[Attribute.ID])
        except pkcs11.PKCS11Error:
            continue
        if oid in wanted:
            found[oid.hex()].append(
                {"class": int(obj[Attribute.CLASS]), "token": bool(obj[Attribute.TOKEN]),
                 "sensitive": bool(obj[Attribute.SENSITIVE]) if int(obj[Attribute.CLASS]) != 2 else None,
                 "extractable": bool(obj[Attribute.EXTRACTABLE]) if int(obj[Attribute.CLASS]) != 2 else None}
            )
print(json.dumps(found))
"""


_DESTROY_OBJECTS = r"""
import sys
import pkcs11
from pkcs11 import Attribute
module, label, pin, wanted = sys.argv[1:5]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(user_pin=pin, rw=True) as session:
    for obj in list(session.get_objects({Attribute.ID: bytes.fromhex(wanted)})):
        obj.destroy()
"""


def destroy_elsewhere(token: SoftToken, object_id: bytes) -> None:
    """Destroy the objects carrying ``object_id`` from another process, as another
    broker on the same token does: it sees the token objects, never this
    process's session objects."""
    import sys  # noqa: PLC0415

    subprocess.run(
        [sys.executable, "-c", _DESTROY_OBJECTS, token.module, token.label, token.pin, object_id.hex()],
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "SOFTHSM2_CONF": str(token.conf)},
    )


def token_objects(token: SoftToken, object_ids: list[bytes]) -> dict[bytes, list[dict[str, Any]]]:
    """The token objects carrying each CKA_ID, as another application sees them.

    Runs plain python-pkcs11 in a separate process (its own C_Initialize and
    login), so the answer does not come from the broker's own sessions.
    Session objects of the broker's process are invisible there by design;
    only token objects are listed.
    """
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _LIST_OBJECTS,
            token.module,
            token.label,
            token.pin,
            *(i.hex() for i in object_ids),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SOFTHSM2_CONF": str(token.conf)},
    )
    found: dict[str, list[dict[str, Any]]] = json.loads(out.stdout)
    return {bytes.fromhex(k): v for k, v in found.items()}
