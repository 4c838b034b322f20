"""The root of trust on a PKCS#11 token (``root = "pkcs11"``).

A non-extractable AES-256 token key, created on the first start and found by
its label afterwards, wraps every software-protected key version's material
in place of the root key file. Wrapping is AES-GCM on the token with a random
12-byte nonce and the wrapping context as additional data; the blob is a
format-1 envelope whose key id is the root key's CKA_ID, so a blob made under
another root key is refused without a token call. The software backend runs
unchanged on top of it (it unwraps a version once and keeps it in native
memory).
"""

from __future__ import annotations

import os
from typing import Any, Final, final

from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass, PKCS11Error
from pkcs11 import KeyType as P11KeyType
from pkcs11.exceptions import GeneralError
from pkcs11.mechanisms import GCMParams

from broker.envelope import HEADER_LEN, NONCE_LEN, OVERHEAD, TAG_LEN, pack_header, parse_header
from broker.errors import DecryptionFailed, InvalidState, Unavailable

from ._defaults import DEFAULT_ROOT_LABEL
from .pool import SESSION_ERRORS, Lease, SessionPool

__all__ = ["DEFAULT_ROOT_LABEL", "TokenRootKey"]

ROOT_ID_LEN: Final = 16
# The root key is never re-keyed in place; its envelopes carry version 1.
ROOT_VERSION: Final = 1
_ROOT_TEMPLATE: Final = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.PRIVATE: True,
}


@final
class TokenRootKey:
    """A :class:`broker.backend.RootKey` held in a PKCS#11 token.

    Args:
        pool: the session pool (shared with the hsm backend when both are
            configured; opening and closing are counted).
        label: CKA_LABEL of the root key object.

    Resource handling:
        ``open`` opens the pool and finds or creates the key; ``aclose``
        releases the pool. Nothing secret is held in Python.
    """

    name = "pkcs11"

    def __init__(self, pool: SessionPool, *, label: str = DEFAULT_ROOT_LABEL) -> None:
        self.pool = pool
        self.label = label
        self._root_id: bytes | None = None
        self._opened = False
        self._prefix = b""

    def __repr__(self) -> str:
        state = "open" if self._root_id is not None else "closed"
        return f"<TokenRootKey label={self.label!r} {state}>"

    @property
    def key_id(self) -> bytes:
        """The root key's CKA_ID (public: it appears in every wrapped blob's header)."""
        if self._root_id is None:
            raise InvalidState("the root key is not open")
        return self._root_id

    async def open(self) -> None:
        """Find the root key by label, or create it on the first start.

        Raises:
            Unavailable: the token cannot be reached, refused the PIN, or holds
                several keys with the label (two brokers racing on a first start).
        """
        if self._root_id is not None:
            return
        await self.pool.open()
        self._opened = True
        label = self.label
        try:
            root_id = await self.pool.run(lambda lease: _find_or_create(lease, label))
        except BaseException:
            await self.aclose()
            raise
        self._root_id = root_id
        self._prefix = pack_header(root_id, ROOT_VERSION, bytes(NONCE_LEN))[: HEADER_LEN - NONCE_LEN]

    async def wrap(self, material: bytes | bytearray, context: bytes) -> bytes:
        """Seal ``material`` under the root key on the token, ``context`` bound as aad.

        Raises:
            InvalidState: not open.
            Unavailable: the token cannot serve now.
        """
        root_id, prefix = self._require()
        data = bytes(material)  # python-pkcs11 one-shot calls take bytes only

        def work(lease: Lease) -> bytes:
            nonce = os.urandom(NONCE_LEN)
            header = prefix + nonce
            key = _root(lease, root_id)
            params = GCMParams(nonce, header + context, TAG_LEN * 8)
            return header + bytes(key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        return await self.pool.run(work)

    async def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """Open a wrapped blob on the token. The caller zeroes the result.

        Raises:
            DecryptionFailed: another root key's blob, wrong context, tampered.
            InvalidState: not open.
            Unavailable: the token cannot serve now.
        """
        root_id, _ = self._require()
        if len(blob) < OVERHEAD:
            raise DecryptionFailed()
        header = parse_header(blob)
        if header.key_id != root_id or header.version != ROOT_VERSION:
            raise DecryptionFailed()
        head = bytes(blob[:HEADER_LEN])
        body = bytes(blob[HEADER_LEN:])

        def work(lease: Lease) -> bytearray | None:
            key = _root(lease, root_id)
            params = GCMParams(header.nonce, head + context, TAG_LEN * 8)
            try:
                return bytearray(key.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params))
            except GeneralError:
                # SoftHSM2's tag mismatch; a dead session looks the same.
                if not lease.alive():
                    raise
                return None
            except SESSION_ERRORS:
                raise
            except PKCS11Error:
                return None

        opened = await self.pool.run(work)
        if opened is None:
            raise DecryptionFailed()
        return opened

    async def aclose(self) -> None:
        """Release the pool. Idempotent."""
        self._root_id = None
        if self._opened:
            self._opened = False
            await self.pool.aclose()

    def _require(self) -> tuple[bytes, bytes]:
        if self._root_id is None:
            raise InvalidState("the root key is not open")
        return self._root_id, self._prefix


def _root(lease: Lease, root_id: bytes) -> Any:
    """This session's object of the root key, cached with the session."""
    slot = (root_id, ObjectClass.SECRET_KEY)
    key = lease.cache.get(slot)
    if key is None:
        found = list(
            lease.session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: root_id, Attribute.TOKEN: True}
            )
        )
        if len(found) != 1:
            raise Unavailable("the root key is no longer on the token")
        key = lease.cache[slot] = found[0]
    return key


def _find_or_create(lease: Lease, label: str) -> bytes:
    session = lease.session
    found = list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label, Attribute.TOKEN: True}
        )
    )
    if len(found) > 1:
        raise Unavailable(f"the token holds {len(found)} secret keys labelled {label!r}; keep exactly one")
    if found:
        key = found[0]
        if key[Attribute.KEY_TYPE] != P11KeyType.AES or key[Attribute.VALUE_LEN] != 32:
            raise Unavailable(f"the token key labelled {label!r} is not an AES-256 key")
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise Unavailable(f"the token key labelled {label!r} is extractable; a root key must not be")
        root_id = bytes(key[Attribute.ID])
        if len(root_id) != ROOT_ID_LEN:
            raise Unavailable(f"the token key labelled {label!r} has no {ROOT_ID_LEN}-byte CKA_ID")
        return root_id
    root_id = os.urandom(ROOT_ID_LEN)
    session.generate_key(
        P11KeyType.AES,
        256,
        id=root_id,
        label=label,
        store=True,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        template=_ROOT_TEMPLATE,
    )
    return root_id
