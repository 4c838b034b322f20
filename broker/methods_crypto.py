"""Methods that use keys: encrypt, decrypt, batches, data keys, signatures, MACs."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from .calls import KEY, VERSION, Call, GroupHandler, Handler, Method
from .envelope import OVERHEAD, parse_header
from .errors import BrokerError, DecryptionFailed, InvalidArgument, InvalidState
from .keys import Key, KeyType, VersionRef
from .lifecycle import check_operation, use_limit
from .params import Field, as_aad, as_bin, as_bin_list, as_bool, as_int

if TYPE_CHECKING:
    from .rpc import Dispatcher

__all__ = ["CRYPTO_METHODS"]

# Data keys are for symmetric ciphers and MAC keys: 1 byte to 8 Kibit.
MAX_DATAKEY_BYTES = 1024
SHA256_LEN = 32


def _pick(values: bytes | list[bytes], indexes: list[int]) -> bytes | list[bytes]:
    return values if isinstance(values, bytes) else [values[i] for i in indexes]


def _check_aad(aad: bytes | list[bytes], count: int) -> None:
    if isinstance(aad, list) and len(aad) != count:
        raise InvalidArgument("aad: one per item, or a single value for all", {"field": "aad"})


def _alone(run: GroupHandler) -> Handler:
    """The single-request method of a group handler: a group of one."""

    async def one(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
        outcome = (await run(d, [call], [args]))[0]
        if isinstance(outcome, BrokerError):
            raise outcome
        return outcome

    return one


def _shared_aad(requests: list[dict[str, Any]]) -> bytes | list[bytes]:
    """The requests' AADs: one value when none has any, else one per request."""
    aads: list[bytes] = [request.get("aad", b"") for request in requests]
    return aads if any(aads) else b""


async def _encrypt_group(d: Dispatcher, calls: list[Call], args: list[dict[str, Any]]) -> list[Any]:
    """``encrypt`` for a group: one lookup, authorization and seal call per key and principal.

    A group larger than the key's uses per version is sealed in parts, each
    within the limit, so that the group rotates the key where the requests
    one by one would have.
    """
    outcomes: list[Any] = [None] * len(calls)
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, request in enumerate(args):
        by_key.setdefault((request["key"], calls[index].ctx.principal.name), []).append(index)
    for (name, _), indexes in by_key.items():
        for index in indexes:
            calls[index].key = name
        try:
            key = await d.key_for(calls[indexes[0]], name)
        except BrokerError as exc:
            for index in indexes:
                outcomes[index] = exc
            continue
        step = use_limit(key) or len(indexes)
        for start in range(0, len(indexes), step):
            part = indexes[start : start + step]
            try:
                sealed = await d.service.encrypt(
                    key, [args[i]["plaintext"] for i in part], _shared_aad([args[i] for i in part])
                )
            except BrokerError as exc:
                for index in part:
                    outcomes[index] = exc
                continue
            for index, ciphertext in zip(part, sealed.outputs, strict=True):
                outcomes[index] = _sealed(calls[index], ciphertext, sealed.version)
    return outcomes


async def _encrypt(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    """``encrypt`` of one request: what :func:`_encrypt_group` answers for a group of one."""
    key = await d.key_for(call, args["key"])
    sealed = await d.service.encrypt(key, [args["plaintext"]], args.get("aad", b""))
    return _sealed(call, sealed.outputs[0], sealed.version)


def _sealed(call: Call, ciphertext: bytes, version: int) -> dict[str, Any]:
    call.version = version
    return {"ciphertext": ciphertext, "version": version}


# Upper bounds of msgpack's framing: one bin's header, and a response's frame
# around its result map (the map's keys and small values included).
_BIN_HEADER = 5
_FRAME = 64


async def _encrypt_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    items = args["items"]
    d.check_batch(len(items))
    d.check_response(call, _FRAME + sum(map(len, items)) + len(items) * (OVERHEAD + _BIN_HEADER))
    aad = args.get("aad", b"")
    _check_aad(aad, len(items))
    key = await d.key_for(call, args["key"])
    check_operation(key, "encrypt")
    if not items:
        return {"ciphertexts": [], "version": key.primary_version}
    sealed = await d.service.encrypt(key, items, aad)
    call.version = sealed.version
    call.details["items"] = len(items)
    return {"ciphertexts": sealed.outputs, "version": sealed.version}


async def _decrypt_group(d: Dispatcher, calls: list[Call], args: list[dict[str, Any]]) -> list[Any]:
    """``decrypt`` for a group: one lookup, authorization and open call per key version and principal."""
    outcomes: list[Any] = [None] * len(calls)
    groups: dict[tuple[bytes, int, bool, str], list[int]] = {}
    for index, request in enumerate(args):
        try:
            header = parse_header(request["ciphertext"])
        except DecryptionFailed as exc:
            outcomes[index] = exc
            continue
        group = (header.key_id, header.version, request["allow_compromised"], calls[index].ctx.principal.name)
        groups.setdefault(group, []).append(index)
    for group, indexes in groups.items():
        try:
            opened = await _open_group(d, group, [calls[i] for i in indexes], [args[i] for i in indexes])
        except BrokerError as exc:
            for index in indexes:
                outcomes[index] = exc
            continue
        for index, result in zip(indexes, opened, strict=True):
            outcomes[index] = result
    return outcomes


async def _open_group(
    d: Dispatcher, group: tuple[bytes, int, bool, str], calls: list[Call], args: list[dict[str, Any]]
) -> list[Any]:
    """Open envelopes under one key version for one principal (``group``: key id, version,
    allow_compromised, principal name)."""
    key_id, version, allow_compromised, _ = group
    key = await d.service.get_by_id(key_id)
    for call in calls:
        call.key, call.version = key.name, version
    grant = d.envelope_grant(calls[0], key, version, allow_compromised, "decrypt")
    for call in calls:
        call.alarm = grant.alarm
    opened = await d.service.decrypt(key, version, [a["ciphertext"] for a in args], _shared_aad(args))
    return [
        DecryptionFailed() if out is None else {"plaintext": out, "key": key.name, "version": version}
        for out in opened
    ]


GroupRun = Callable[[Key, int, list[bytes], bytes | list[bytes]], Awaitable[list[bytes | None]]]


async def _over_groups(
    d: Dispatcher, call: Call, args: dict[str, Any], op: str, run: GroupRun
) -> tuple[list[bytes | None], list[dict[str, Any] | None]]:
    """Run ``run`` once per (key, version) group of envelopes; one result and error per item.

    A BrokerError from one group (its backend unavailable, say) becomes that
    group's per-item errors: the other groups' items are still answered.
    """
    envelopes = args["ciphertexts"]
    d.check_batch(len(envelopes))
    aad = args.get("aad", b"")
    _check_aad(aad, len(envelopes))
    groups, errors = await d.open_groups(call, envelopes, aad, args["allow_compromised"], op)
    out: list[bytes | None] = [None] * len(envelopes)
    failed = DecryptionFailed().to_wire()
    for key, version, indexes in groups:
        try:
            results = await run(key, version, [envelopes[i] for i in indexes], _pick(aad, indexes))
        except BrokerError as exc:
            for index in indexes:
                errors[index] = exc.to_wire()
            continue
        for index, item in zip(indexes, results, strict=True):
            out[index] = item
            if item is None:
                errors[index] = failed
    call.details["items"] = len(envelopes)
    call.details["failed"] = sum(e is not None for e in errors)
    return out, errors


async def _decrypt_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    plaintexts, errors = await _over_groups(d, call, args, "decrypt_batch", d.service.decrypt)
    return {"plaintexts": plaintexts, "errors": errors}


async def _rewrap_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    async def rewrap(
        key: Key, version: int, envs: list[bytes], aad: bytes | list[bytes]
    ) -> list[bytes | None]:
        _, sealed = await d.service.rewrap(key, version, envs, aad)
        return sealed

    ciphertexts, errors = await _over_groups(d, call, args, "rewrap_batch", rewrap)
    return {"ciphertexts": ciphertexts, "errors": errors}


async def _datakey(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    count, size = args["count"], args["bytes"]
    d.check_batch(count)
    # Each key is a map: "wrapped" and its envelope, and "plaintext" and the key if asked.
    entry = 1 + len("wrapped") + 1 + _BIN_HEADER + size + OVERHEAD
    if args["plaintext"]:
        entry += len("plaintext") + 1 + _BIN_HEADER + size
    d.check_response(call, _FRAME + count * entry)
    key = await d.key_for(call, args["key"])
    check_operation(key, "datakey")
    plain = [os.urandom(size) for _ in range(count)]
    sealed = await d.service.encrypt(key, plain, args.get("aad", b""))
    call.version = sealed.version
    call.details["items"] = count
    if args["plaintext"]:
        keys = [{"plaintext": p, "wrapped": w} for p, w in zip(plain, sealed.outputs, strict=True)]
    else:
        keys = [{"wrapped": w} for w in sealed.outputs]
    return {"keys": keys, "version": sealed.version}


def _signed_data(key: Key, args: dict[str, Any]) -> tuple[bytes, bool]:
    message: bytes | None = args.get("message")
    digest: bytes | None = args.get("digest")
    if (message is None) == (digest is None):
        raise InvalidArgument("give exactly one of message and digest", {"field": "message"})
    if message is not None:
        return message, False
    assert digest is not None
    if key.type is KeyType.ED25519:
        raise InvalidArgument("ed25519 signs messages only, not digests", {"field": "digest"})
    if len(digest) != SHA256_LEN:
        raise InvalidArgument("digest must be a 32-byte SHA-256", {"field": "digest"})
    return digest, True


async def _sign(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["key"])
    check_operation(key, "sign")
    data, prehashed = _signed_data(key, args)
    version, signature = await d.service.sign(key, data, prehashed=prehashed)
    call.version = version
    return {"signature": signature, "version": version}


async def _verify(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["key"])
    check_operation(key, "verify")
    data, prehashed = _signed_data(key, args)

    async def made(ref: VersionRef) -> bool:
        return await d.service.verify(key, ref, data, args["signature"], prehashed=prehashed)

    return await _verified(d, call, key, args, made)


async def _mac(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["key"])
    version, tag = await d.service.mac(key, args["message"])
    call.version = version
    return {"mac": tag, "version": version}


async def _verify_mac(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["key"])
    check_operation(key, "verify_mac")

    async def made(ref: VersionRef) -> bool:
        return await d.service.verify_mac(key, ref, args["message"], args["mac"])

    return await _verified(d, call, key, args, made)


async def _verified(
    d: Dispatcher, call: Call, key: Key, args: dict[str, Any], made: Callable[[VersionRef], Awaitable[bool]]
) -> dict[str, bool]:
    """``{"valid": ...}``: whether a version the call may check ``made`` the signature or MAC.

    Without ``version`` or ``allow_compromised``, compromised versions are
    not checked; if none of the others made it, but a compromised one did,
    the answer is ``invalid_state`` rather than ``valid: false``: the
    signature is genuine, and only ``allow_compromised`` accepts it.
    """
    allow = args["allow_compromised"]
    for grant in d.service.verification_versions(key, args.get("version"), allow_compromised=allow):
        ref = key.ref(grant.version.number)
        if await made(ref):
            call.version, call.alarm = ref.version, grant.alarm
            return {"valid": True}
    if args.get("version") is None and not allow:
        for grant in d.service.verification_versions(key, None, allow_compromised=True):
            number = grant.version.number
            if grant.alarm and await made(key.ref(number)):
                call.version = number
                raise InvalidState(
                    f"key {key.name!r}: version {number}, which made this, is compromised; "
                    "accepting it needs allow_compromised",
                    {"version": number},
                )
    return {"valid": False}


_ALLOW_COMPROMISED = Field(as_bool, default=False)

CRYPTO_METHODS: Mapping[str, Method] = {
    "encrypt": Method(
        {"key": KEY, "plaintext": Field(as_bin, required=True), "aad": Field(as_bin)},
        _encrypt,
        group=_encrypt_group,
    ),
    "decrypt": Method(
        {
            "ciphertext": Field(as_bin, required=True),
            "aad": Field(as_bin),
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _alone(_decrypt_group),
        group=_decrypt_group,
    ),
    "encrypt_batch": Method(
        {"key": KEY, "items": Field(as_bin_list, required=True), "aad": Field(as_aad)}, _encrypt_batch
    ),
    "decrypt_batch": Method(
        {
            "ciphertexts": Field(as_bin_list, required=True),
            "aad": Field(as_aad),
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _decrypt_batch,
    ),
    "rewrap_batch": Method(
        {
            "ciphertexts": Field(as_bin_list, required=True),
            "aad": Field(as_aad),
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _rewrap_batch,
    ),
    "datakey": Method(
        {
            "key": KEY,
            "count": Field(as_int(1, 2**32), default=1),
            "bytes": Field(as_int(1, MAX_DATAKEY_BYTES), default=32),
            "plaintext": Field(as_bool, default=True),
            "aad": Field(as_bin),
        },
        _datakey,
    ),
    "sign": Method({"key": KEY, "message": Field(as_bin), "digest": Field(as_bin)}, _sign),
    "verify": Method(
        {
            "key": KEY,
            "message": Field(as_bin),
            "digest": Field(as_bin),
            "signature": Field(as_bin, required=True),
            "version": VERSION,
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _verify,
    ),
    "mac": Method({"key": KEY, "message": Field(as_bin, required=True)}, _mac),
    "verify_mac": Method(
        {
            "key": KEY,
            "message": Field(as_bin, required=True),
            "mac": Field(as_bin, required=True),
            "version": VERSION,
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _verify_mac,
    ),
}
