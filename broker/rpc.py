"""The RPC method table: parameters, authorization, audit, dispatch to the service.

Every call goes: parse params (invalid_argument) → find the key → authorize
(deny by default; a denial is audited) → lifecycle checks and the operation
in the service → one audit record, durable before the reply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from . import __version__
from .approvals import Approvals
from .audit import AuditLog
from .envelope import parse_header
from .errors import (
    ApprovalRequired,
    BrokerError,
    DecryptionFailed,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unavailable,
    UnknownMethod,
)
from .keys import Classification, Key, KeyState, KeyType, check_name
from .lifecycle import Transition, check_operation
from .params import (
    Field,
    Spec,
    as_aad,
    as_bin,
    as_bin_list,
    as_bool,
    as_enum,
    as_int,
    as_labels,
    as_str,
    parse,
)
from .policy import AuthzRequest, RpcMethod
from .service import KeyService
from .subscriptions import Subscriptions

if TYPE_CHECKING:
    from .config import Config
    from .connection import RequestContext
    from .plugins import Plugins

__all__ = ["Dispatcher", "Kind"]

log = logging.getLogger("keybroker.rpc")

PROTOCOL_VERSION = 1
UINT32 = 2**32 - 1
# Data keys are for symmetric ciphers and MAC keys: 1 byte to 8 Kibit.
MAX_DATAKEY_BYTES = 1024
SHA256_LEN = 32


@dataclass(slots=True)
class Call:
    """One request on its way through the table; collects what the audit record says."""

    ctx: RequestContext
    method: str
    key: str | None = None
    version: int | None = None
    alarm: bool = False
    details: dict[str, str | int | bool | None] = field(default_factory=dict)


Handler = Callable[["Dispatcher", Call, dict[str, Any]], Awaitable[Any]]


class Kind(Enum):
    """What a method does, which decides how it meets a failing audit log."""

    # Metadata reads: with ``audit.fail_open_reads`` they are served even
    # when their record cannot be written.
    READ = "read"
    # Uses of keys: the result is released only once its record is durable.
    USE = "use"
    # State changes: a "requested" record is made durable before the change,
    # so a change can never happen unaudited (fail closed).
    CHANGE = "change"


@dataclass(frozen=True, slots=True)
class Method:
    spec: Spec
    run: Handler
    kind: Kind = Kind.USE
    audited: bool = True


_NAME = Field(as_str, required=True)
_KEY = Field(as_str, required=True)
_VERSION = Field(as_int(1, UINT32))
_PERIOD = Field(as_int(0, 2**40))
_USES = Field(as_int(0, 2**62))
_TIME = Field(as_int(0, 2**40))


class Dispatcher:
    """Implements the connection ``Handler`` over a :class:`KeyService`."""

    def __init__(
        self,
        *,
        config: Config,
        service: KeyService,
        plugins: Plugins,
        audit: AuditLog,
        approvals: Approvals,
        subscriptions: Subscriptions,
    ) -> None:
        self.config = config
        self.service = service
        self.plugins = plugins
        self.audit = audit
        self.approvals = approvals
        self.subscriptions = subscriptions
        self.max_batch = config.limits.max_batch_items
        self.extra: dict[str, RpcMethod] = plugins.rpc_methods()
        clash = set(self.extra) & set(METHODS)
        if clash:
            raise ValueError(f"plugin RPC methods clash with built-in ones: {sorted(clash)}")

    # --- the Handler protocol ---------------------------------------------------

    async def handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        entry = METHODS.get(method)
        if entry is None:
            if method in self.extra:
                return await self._plugin_method(ctx, method, params)
            raise UnknownMethod(f"no method {method[:64]!r}")
        call = Call(ctx, method)
        if not entry.audited:
            return await entry.run(self, call, parse(entry.spec, params))
        try:
            args = parse(entry.spec, params)
            if entry.kind is Kind.CHANGE:
                await self._record(Call(ctx, method, key=_target(args)), "requested", None)
            result = await entry.run(self, call, args)
        except BrokerError as exc:
            outcome = "denied" if isinstance(exc, PermissionDenied) else "error"
            await self._record(call, outcome, exc.code)
            raise
        try:
            await self._record(call, "allowed", None)
        except Unavailable:
            if entry.kind is not Kind.READ or not self.config.audit.fail_open_reads:
                raise
            log.warning("audit log unavailable; serving %s unaudited (audit.fail_open_reads)", method)
        return result

    def connection_closed(self, ctx: RequestContext) -> None:
        """End the connection's subscriptions."""
        self.subscriptions.closed(ctx)

    # --- helpers ----------------------------------------------------------------

    async def _record(self, call: Call, outcome: str, code: str | None) -> None:
        await self.audit.record(
            principal=call.ctx.principal.name,
            op=call.method,
            outcome=outcome,
            key=call.key,
            version=call.version,
            code=code,
            alarm=call.alarm,
            details=call.details or None,
        )

    def _allowed(
        self, call: Call, key_name: str | None, key: Key | None = None, op: str | None = None
    ) -> bool:
        request = AuthzRequest(
            principal=call.ctx.principal.name,
            operation=op or call.method,
            key=key_name,
            classification=key.classification.value if key is not None else None,
        )
        return self.plugins.authorize(request)

    async def _key(self, call: Call, name: str) -> Key:
        """Find a key and authorize the call on it.

        An unauthorized caller learns nothing about whether the key exists.
        """
        call.key = name
        key = await self.service.find(name)
        if not self._allowed(call, name, key):
            raise PermissionDenied(f"{call.ctx.principal.name} may not {call.method} {name!r}")
        if key is None:
            raise NotFound(f"no key named {name!r}")
        return key

    def _authorize_no_key(self, call: Call) -> None:
        if not self._allowed(call, None):
            raise PermissionDenied(f"{call.ctx.principal.name} may not {call.method}")

    def _check_batch(self, count: int) -> None:
        if count > self.max_batch:
            raise LimitExceeded(
                f"{count} items exceed the batch limit of {self.max_batch}", {"limit": self.max_batch}
            )

    def _meta(self, call: Call, key: Key) -> dict[str, Any]:
        call.version = key.primary_version
        return self.service.metadata(key)

    async def _plugin_method(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        entry = self.extra[method]
        call = Call(ctx, method)
        try:
            if entry.key_param is None:
                self._authorize_no_key(call)
            else:
                await self._key(call, as_str(entry.key_param, params.get(entry.key_param)))
            result = await entry.handler(ctx, params)
        except BrokerError as exc:
            await self._record(call, "denied" if isinstance(exc, PermissionDenied) else "error", exc.code)
            raise
        await self._record(call, "allowed", None)
        return result

    # --- envelopes --------------------------------------------------------------

    async def _open_groups(
        self,
        call: Call,
        envelopes: Sequence[bytes],
        aad: bytes | list[bytes],
        allow_compromised: bool,
        op: str,
    ) -> tuple[list[tuple[Key, int, list[int]]], list[dict[str, Any] | None]]:
        """Group envelopes by (key, version), checking permission and state per group.

        Returns the groups that may proceed and a per-item error list with
        the failures found so far (None where the item is still fine).
        """
        errors: list[dict[str, Any] | None] = [None] * len(envelopes)
        groups: dict[tuple[bytes, int], list[int]] = {}
        for index, envelope in enumerate(envelopes):
            try:
                header = parse_header(envelope)
            except DecryptionFailed as exc:
                errors[index] = exc.to_wire()
                continue
            groups.setdefault((header.key_id, header.version), []).append(index)
        ready: list[tuple[Key, int, list[int]]] = []
        for (key_id, version), indexes in groups.items():
            try:
                key = await self.service.get_by_id(key_id)
                if not self._allowed(call, key.name, key, op):
                    raise PermissionDenied(f"{call.ctx.principal.name} may not {op} with {key.name!r}")
                if key.type is not KeyType.AES256_GCM:
                    raise DecryptionFailed()
                grant = self.service.process_grant(key, version, allow_compromised=allow_compromised)
                call.alarm = call.alarm or grant.alarm
                ready.append((key, version, indexes))
            except BrokerError as exc:
                wire = exc.to_wire()
                for index in indexes:
                    errors[index] = wire
        if len(ready) == 1:
            call.key, call.version = ready[0][0].name, ready[0][1]
        elif ready:
            call.details["keys"] = len(ready)
        return ready, errors


def _target(args: Mapping[str, Any]) -> str | None:
    name = args.get("name")
    return name if isinstance(name, str) else None


def _pick(values: bytes | list[bytes], indexes: list[int]) -> bytes | list[bytes]:
    return values if isinstance(values, bytes) else [values[i] for i in indexes]


def _check_aad(aad: bytes | list[bytes], count: int) -> None:
    if isinstance(aad, list) and len(aad) != count:
        raise InvalidArgument("aad: one per item, or a single value for all", {"field": "aad"})


# --- methods -----------------------------------------------------------------


async def _ping(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    return {"version": __version__, "protocol": PROTOCOL_VERSION, "node": d.config.node}


async def _whoami(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = call.ctx.principal.name
    return {"principal": name, "roles": d.plugins.roles(name)}


async def _key_create(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = check_name(args["name"])
    call.key = name
    if not d._allowed(call, name):
        raise PermissionDenied(f"{call.ctx.principal.name} may not key.create {name!r}")
    key = await d.service.create(
        name=name,
        key_type=args["type"],
        protection=args["protection"],
        classification=args["classification"],
        activate=args["activate"],
        rotation_period_s=args.get("rotation_period_s", 0),
        max_uses_per_version=args.get("max_uses_per_version"),
        exportable=args["exportable"],
        labels=args.get("labels", {}),
        activate_at=args.get("activate_at"),
        deactivate_at=args.get("deactivate_at"),
    )
    return d._meta(call, key)


async def _key_get(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    return d._meta(call, await d._key(call, args["name"]))


async def _key_list(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d._authorize_no_key(call)
    keys = await d.service.list(
        prefix=args["prefix"], state=args.get("state"), limit=args["limit"], after=args.get("cursor")
    )
    visible = [k for k in keys if d._allowed(call, k.name, k, "key.get")]
    cursor = keys[-1].name if len(keys) == args["limit"] else None
    call.details["count"] = len(visible)
    return {"keys": [d.service.metadata(k) for k in visible], "cursor": cursor}


async def _key_rotate(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    await d._key(call, args["name"])
    return d._meta(call, await d.service.rotate(args["name"]))


async def _key_update(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = args.pop("name")
    await d._key(call, name)
    return d._meta(call, await d.service.update(name, **args))


def _lifecycle(transition: Transition) -> Handler:
    async def run(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
        await d._key(call, args["name"])
        key = await d.service.lifecycle(args["name"], transition, pending_days=args.get("pending_days"))
        return d._meta(call, key)

    return run


async def _key_schedule_destroy(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["name"])
    required = d.plugins.required_approvals(key, "destroy")
    if required > 0:
        request = d.approvals.request(
            op=call.method, key=key.name, params=args, requester=call.ctx.principal.name, required=required
        )
        call.details["request_id"] = request.id
        raise ApprovalRequired(
            f"destroying {key.name!r} needs {required} approvals by other principals",
            {"request_id": request.id, **request.summary()},
        )
    key = await d.service.lifecycle(key.name, Transition.SCHEDULE_DESTROY, pending_days=args["pending_days"])
    return d._meta(call, key)


async def _approve(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    request = d.approvals.get(args["request_id"])
    call.details["request_id"] = request.id
    await d._key(call, request.key)
    request = d.approvals.approve(request.id, call.ctx.principal.name)
    call.details["approvals"] = len(request.approvers)
    if request.done:
        # The approved action runs as the requester asked it, audited as theirs.
        action = Call(call.ctx, request.op, key=request.key)
        action.details = {"approved_by": ",".join(sorted(request.approvers)), "requester": request.requester}
        try:
            key = await d.service.lifecycle(
                request.key, Transition.SCHEDULE_DESTROY, pending_days=request.params["pending_days"]
            )
        except BrokerError as exc:
            await d._record(action, "error", exc.code)
            raise
        action.version = key.primary_version
        await d._record(action, "allowed", None)
    return request.summary()


async def _subscribe(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d._authorize_no_key(call)
    principal = call.ctx.principal.name

    def visible(name: str) -> bool:
        return d.plugins.authorize(AuthzRequest(principal=principal, operation="key.get", key=name))

    call.ctx.keep_open = True
    d.subscriptions.add(call.ctx, args["prefix"], visible)
    call.details["prefix"] = args["prefix"]
    return {}


async def _key_compromise(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    await d._key(call, args["name"])
    key = await d.service.compromise(args["name"], args.get("version"))
    call.alarm = True
    return d._meta(call, key)


async def _key_public(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["name"])
    version, pem = await d.service.public_pem(key, args.get("version"))
    call.version = version
    return {"pem": pem.decode("ascii"), "version": version}


async def _encrypt(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["key"])
    sealed = await d.service.encrypt(key, [args["plaintext"]], args.get("aad", b""))
    call.version = sealed.version
    return {"ciphertext": sealed.outputs[0], "version": sealed.version}


async def _encrypt_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    items = args["items"]
    d._check_batch(len(items))
    aad = args.get("aad", b"")
    _check_aad(aad, len(items))
    key = await d._key(call, args["key"])
    check_operation(key, "encrypt")
    if not items:
        return {"ciphertexts": [], "version": key.primary_version}
    sealed = await d.service.encrypt(key, items, aad)
    call.version = sealed.version
    call.details["items"] = len(items)
    return {"ciphertexts": sealed.outputs, "version": sealed.version}


async def _decrypt(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    envelope = args["ciphertext"]
    header = parse_header(envelope)
    key = await d.service.get_by_id(header.key_id)
    call.key, call.version = key.name, header.version
    if not d._allowed(call, key.name, key):
        raise PermissionDenied(f"{call.ctx.principal.name} may not decrypt with {key.name!r}")
    if key.type is not KeyType.AES256_GCM:
        raise DecryptionFailed()
    grant = d.service.process_grant(key, header.version, allow_compromised=args["allow_compromised"])
    call.alarm = grant.alarm
    plaintext = (await d.service.decrypt(key, header.version, [envelope], args.get("aad", b"")))[0]
    if plaintext is None:
        raise DecryptionFailed()
    return {"plaintext": plaintext, "key": key.name, "version": header.version}


async def _decrypt_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    envelopes = args["ciphertexts"]
    d._check_batch(len(envelopes))
    aad = args.get("aad", b"")
    _check_aad(aad, len(envelopes))
    groups, errors = await d._open_groups(call, envelopes, aad, args["allow_compromised"], "decrypt_batch")
    plaintexts: list[bytes | None] = [None] * len(envelopes)
    failed = DecryptionFailed().to_wire()
    for key, version, indexes in groups:
        opened = await d.service.decrypt(key, version, [envelopes[i] for i in indexes], _pick(aad, indexes))
        for index, plaintext in zip(indexes, opened, strict=True):
            plaintexts[index] = plaintext
            if plaintext is None:
                errors[index] = failed
    call.details["items"] = len(envelopes)
    call.details["failed"] = sum(e is not None for e in errors)
    return {"plaintexts": plaintexts, "errors": errors}


async def _rewrap_batch(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    envelopes = args["ciphertexts"]
    d._check_batch(len(envelopes))
    aad = args.get("aad", b"")
    _check_aad(aad, len(envelopes))
    groups, errors = await d._open_groups(call, envelopes, aad, args["allow_compromised"], "rewrap_batch")
    out: list[bytes | None] = [None] * len(envelopes)
    failed = DecryptionFailed().to_wire()
    for key, version, indexes in groups:
        try:
            _, sealed = await d.service.rewrap(
                key, version, [envelopes[i] for i in indexes], _pick(aad, indexes)
            )
        except BrokerError as exc:
            for index in indexes:
                errors[index] = exc.to_wire()
            continue
        for index, envelope in zip(indexes, sealed, strict=True):
            out[index] = envelope
            if envelope is None:
                errors[index] = failed
    call.details["items"] = len(envelopes)
    call.details["failed"] = sum(e is not None for e in errors)
    return {"ciphertexts": out, "errors": errors}


async def _datakey(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    count, size = args["count"], args["bytes"]
    d._check_batch(count)
    key = await d._key(call, args["key"])
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
    message, digest = args.get("message"), args.get("digest")
    if (message is None) == (digest is None):
        raise InvalidArgument("give exactly one of message and digest", {"field": "message"})
    if digest is None:
        return message, False
    if key.type is KeyType.ED25519:
        raise InvalidArgument("ed25519 signs messages only, not digests", {"field": "digest"})
    if len(digest) != SHA256_LEN:
        raise InvalidArgument("digest must be a 32-byte SHA-256", {"field": "digest"})
    return digest, True


async def _sign(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["key"])
    check_operation(key, "sign")
    data, prehashed = _signed_data(key, args)
    version, signature = await d.service.sign(key, data, prehashed=prehashed)
    call.version = version
    return {"signature": signature, "version": version}


async def _verify(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["key"])
    check_operation(key, "verify")
    data, prehashed = _signed_data(key, args)
    for grant in d.service.verification_versions(
        key, args.get("version"), allow_compromised=args["allow_compromised"]
    ):
        ref = key.ref(grant.version.number)
        if await d.service.verify(key, ref, data, args["signature"], prehashed=prehashed):
            call.version, call.alarm = ref.version, grant.alarm
            return {"valid": True}
    return {"valid": False}


async def _mac(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["key"])
    version, tag = await d.service.mac(key, args["message"])
    call.version = version
    return {"mac": tag, "version": version}


async def _verify_mac(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d._key(call, args["key"])
    check_operation(key, "verify_mac")
    for grant in d.service.verification_versions(
        key, args.get("version"), allow_compromised=args["allow_compromised"]
    ):
        ref = key.ref(grant.version.number)
        if await d.service.verify_mac(key, ref, args["message"], args["mac"]):
            call.version, call.alarm = ref.version, grant.alarm
            return {"valid": True}
    return {"valid": False}


_ALLOW_COMPROMISED = Field(as_bool, default=False)
_NAME_ONLY: Spec = {"name": _NAME}

METHODS: Mapping[str, Method] = {
    "ping": Method({}, _ping, Kind.READ, audited=False),
    "whoami": Method({}, _whoami, Kind.READ, audited=False),
    "key.create": Method(
        {
            "name": _NAME,
            "type": Field(as_enum(KeyType), required=True),
            "protection": Field(as_str, default="software"),
            "classification": Field(as_enum(Classification), default=Classification.INTERNAL),
            "rotation_period_s": _PERIOD,
            "max_uses_per_version": _USES,
            "activate": Field(as_bool, default=True),
            "exportable": Field(as_bool, default=False),
            "labels": Field(as_labels),
            "activate_at": _TIME,
            "deactivate_at": _TIME,
        },
        _key_create,
        Kind.CHANGE,
    ),
    "key.get": Method(_NAME_ONLY, _key_get, Kind.READ),
    "key.list": Method(
        {
            "prefix": Field(as_str, default=""),
            "state": Field(as_enum(KeyState)),
            "limit": Field(as_int(1, 1000), default=100),
            "cursor": Field(as_str),
        },
        _key_list,
        Kind.READ,
    ),
    "key.rotate": Method(_NAME_ONLY, _key_rotate, Kind.CHANGE),
    "key.update": Method(
        {
            "name": _NAME,
            "rotation_period_s": _PERIOD,
            "max_uses_per_version": _USES,
            "min_decrypt_version": _VERSION,
            "labels": Field(as_labels),
            "activate_at": _TIME,
            "deactivate_at": _TIME,
        },
        _key_update,
        Kind.CHANGE,
    ),
    "key.activate": Method(_NAME_ONLY, _lifecycle(Transition.ACTIVATE), Kind.CHANGE),
    "key.deactivate": Method(_NAME_ONLY, _lifecycle(Transition.DEACTIVATE), Kind.CHANGE),
    "key.disable": Method(_NAME_ONLY, _lifecycle(Transition.DISABLE), Kind.CHANGE),
    "key.enable": Method(_NAME_ONLY, _lifecycle(Transition.ENABLE), Kind.CHANGE),
    "key.compromise": Method({"name": _NAME, "version": _VERSION}, _key_compromise, Kind.CHANGE),
    "key.schedule_destroy": Method(
        {"name": _NAME, "pending_days": Field(as_int(7, 30), default=30)},
        _key_schedule_destroy,
        Kind.CHANGE,
    ),
    "key.cancel_destroy": Method(_NAME_ONLY, _lifecycle(Transition.CANCEL_DESTROY), Kind.CHANGE),
    "key.public": Method({"name": _NAME, "version": _VERSION}, _key_public, Kind.READ),
    "encrypt": Method(
        {"key": _KEY, "plaintext": Field(as_bin, required=True), "aad": Field(as_bin)}, _encrypt
    ),
    "decrypt": Method(
        {
            "ciphertext": Field(as_bin, required=True),
            "aad": Field(as_bin),
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _decrypt,
    ),
    "encrypt_batch": Method(
        {"key": _KEY, "items": Field(as_bin_list, required=True), "aad": Field(as_aad)}, _encrypt_batch
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
            "key": _KEY,
            "count": Field(as_int(1, 2**32), default=1),
            "bytes": Field(as_int(1, MAX_DATAKEY_BYTES), default=32),
            "plaintext": Field(as_bool, default=True),
            "aad": Field(as_bin),
        },
        _datakey,
    ),
    "sign": Method({"key": _KEY, "message": Field(as_bin), "digest": Field(as_bin)}, _sign),
    "verify": Method(
        {
            "key": _KEY,
            "message": Field(as_bin),
            "digest": Field(as_bin),
            "signature": Field(as_bin, required=True),
            "version": _VERSION,
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _verify,
    ),
    "approve": Method({"request_id": Field(as_str, required=True)}, _approve, Kind.CHANGE),
    "subscribe": Method({"prefix": Field(as_str, default="")}, _subscribe),
    "mac": Method({"key": _KEY, "message": Field(as_bin, required=True)}, _mac),
    "verify_mac": Method(
        {
            "key": _KEY,
            "message": Field(as_bin, required=True),
            "mac": Field(as_bin, required=True),
            "version": _VERSION,
            "allow_compromised": _ALLOW_COMPROMISED,
        },
        _verify_mac,
    ),
}
