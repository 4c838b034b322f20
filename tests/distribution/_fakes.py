"""A controllable clock and cached RSA keys, shared by the distribution tests."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import rsa

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
