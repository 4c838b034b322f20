"""Test doubles shared by the distribution tests."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import rsa
from keybroker_softkeys import SoftwareBackend

from broker.backend import Backend, RootKey
from broker.config import Config
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from broker.keys import KeyType, VersionRef

_RSA: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(bits: int = 3072) -> rsa.RSAPrivateKey:
    """One RSA key per size for the whole run (generation is slow)."""
    if bits not in _RSA:
        _RSA[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _RSA[bits]


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TokenBackend(SoftwareBackend):
    """Stands in for an HSM: usable keys whose material never leaves the backend."""

    protection = "hsm"

    async def export_material(self, ref: VersionRef) -> bytearray:
        raise InvalidArgument("hsm material never leaves the token")

    async def import_material(
        self, key_id: bytes, version: int, key_type: KeyType, material: bytearray
    ) -> bytes:
        raise InvalidArgument("the token does not take imported material")


class TokenPlugin:
    """Registers :class:`TokenBackend` as protection "hsm"."""

    @hookimpl
    def kb_backends(self, config: Config, root: RootKey) -> Sequence[Backend]:
        return [TokenBackend(root)]
