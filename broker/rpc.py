"""The RPC dispatcher: parameters, authorization, audit, dispatch to the service.

Every call goes: parse params (invalid_argument) → find the key → authorize
(deny by default; a denial is audited) → lifecycle checks and the operation
in the service → one audit record, durable before the reply. The method
tables live in :mod:`broker.methods_keys` and :mod:`broker.methods_crypto`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .approvals import Approvals
from .audit import AuditLog
from .calls import Call, Kind, Method, as_key_name
from .envelope import parse_header
from .errors import (
    BrokerError,
    DecryptionFailed,
    Internal,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unavailable,
    UnknownMethod,
)
from .keys import Key, KeyType
from .lifecycle import UseGrant
from .logs import request_id
from .methods_crypto import CRYPTO_METHODS
from .methods_distribution import DISTRIBUTION_METHODS
from .methods_keys import KEY_METHODS, target
from .methods_report import REPORT_METHODS
from .metrics import Metrics
from .params import parse
from .policy import RpcMethod
from .service import KeyService
from .subscriptions import Subscriptions

if TYPE_CHECKING:
    from .config import Config
    from .connection import RequestContext
    from .plugins import Plugins

__all__ = ["METHODS", "Dispatcher"]

log = logging.getLogger("keybroker.rpc")

METHODS: Mapping[str, Method] = {**KEY_METHODS, **CRYPTO_METHODS, **DISTRIBUTION_METHODS, **REPORT_METHODS}


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
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.service = service
        self.plugins = plugins
        self.audit = audit
        self.approvals = approvals
        self.subscriptions = subscriptions
        self.metrics = metrics
        self._request_ids = itertools.count(1)
        self.max_batch = config.limits.max_batch_items
        self.max_message = config.limits.max_message_bytes
        self.extra: dict[str, RpcMethod] = plugins.rpc_methods()
        # Methods whose queued requests a connection may hand over together.
        self.groupable = frozenset(name for name, entry in METHODS.items() if entry.group is not None)
        # Every change waits for its "requested" record's flush (see _run).
        self.suspending = frozenset(
            name for name, entry in METHODS.items() if entry.audited and entry.kind is Kind.CHANGE
        )
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
        started = time.perf_counter()
        code = "ok"
        request_id.set(f"{ctx.connection_id:x}-{next(self._request_ids):x}")
        try:
            return await self._run(entry, call, params)
        except BrokerError as exc:
            code = exc.code
            raise
        finally:
            items = call.details.get("items")
            self.metrics.observe(
                method, code, time.perf_counter() - started, items if isinstance(items, int) else None
            )

    async def _run(self, entry: Method, call: Call, params: dict[str, Any]) -> Any:
        if not entry.audited:
            return await entry.run(self, call, parse(entry.spec, params))
        # A change's "requested" record is durable before the change is made,
        # so no change can outlive its record; outcomes (and every use and
        # read) are written before the reply and fsynced per [audit] sync.
        try:
            args = parse(entry.spec, params)
            if entry.kind is Kind.CHANGE:
                await self.record(Call(call.ctx, call.method, key=target(args)), "requested", None)
            result = await entry.run(self, call, args)
        except Exception as exc:
            await self.record(call, *_failure(exc), durable=False)
            raise
        try:
            await self.record(call, "allowed", None, durable=False)
        except Unavailable:
            if entry.kind is not Kind.READ or not self.config.audit.fail_open_reads:
                raise
            log.warning("audit log unavailable; serving %s unaudited (audit.fail_open_reads)", call.method)
        return result

    async def handle_group(
        self, contexts: Sequence[RequestContext], method: str, params: list[dict[str, Any]]
    ) -> list[Any]:
        """Run requests of one groupable method; one outcome per request.

        Each request is parsed, authorized, counted, audited (a record of its
        own) and answered as :meth:`handle` would, but the group shares one
        key lookup and authorization per key and principal, one use
        reservation and one native call, and its records reach the audit log
        in one write. ``contexts[i]`` is the caller of ``params[i]``.
        """
        entry = METHODS[method]
        run = entry.group
        assert run is not None and entry.audited and entry.kind is Kind.USE
        started = time.perf_counter()
        request_id.set(f"{contexts[0].connection_id:x}-{next(self._request_ids):x}+{len(params)}")
        calls = [Call(ctx, method) for ctx in contexts]
        outcomes: list[Any] = [None] * len(params)
        parsed: list[tuple[int, dict[str, Any]]] = []
        for index, request in enumerate(params):
            try:
                parsed.append((index, parse(entry.spec, request)))
            except BrokerError as exc:
                outcomes[index] = exc
        if parsed:
            results = await run(self, [calls[i] for i, _ in parsed], [args for _, args in parsed])
            for (index, _), result in zip(parsed, results, strict=True):
                outcomes[index] = result
        try:
            fields = [_audit_fields(call, *_outcome(out)) for call, out in zip(calls, outcomes, strict=True)]
            await self.audit.record_many(fields, durable=False)
        except Unavailable as exc:
            # A use is released only once its record is written.
            outcomes = [exc] * len(outcomes)
        elapsed = time.perf_counter() - started
        codes: dict[str, int] = {}
        for out in outcomes:
            code = out.code if isinstance(out, BrokerError) else "ok"
            codes[code] = codes.get(code, 0) + 1
        for code, count in codes.items():
            self.metrics.observe(method, code, elapsed, None, count)
        return outcomes

    def connection_closed(self, ctx: RequestContext) -> None:
        """End the connection's subscriptions."""
        self.subscriptions.closed(ctx)

    # --- helpers ----------------------------------------------------------------

    async def record(self, call: Call, outcome: str, code: str | None, *, durable: bool = True) -> None:
        """Audit ``call``; ``durable=False`` may answer before the fsync (``[audit] sync``)."""
        # record_many, unlike record, returns the records unbuilt: nothing here reads them.
        await self.audit.record_many([_audit_fields(call, outcome, code)], durable=durable)

    def allowed(
        self, call: Call, key_name: str | None, key: Key | None = None, op: str | None = None
    ) -> bool:
        return self.plugins.decide(
            call.ctx.principal.name,
            op or call.method,
            key_name,
            key.classification.value if key is not None else None,
        )

    async def key_for(self, call: Call, name: str) -> Key:
        """Find a key and authorize the call on it.

        An unauthorized caller learns nothing about whether the key exists.
        """
        call.key = name
        key = await self.service.find(name)
        if not self.allowed(call, name, key):
            raise PermissionDenied(f"{call.ctx.principal.name} may not {call.method} {name!r}")
        if key is None:
            raise NotFound(f"no key named {name!r}")
        return key

    def authorize_no_key(self, call: Call) -> None:
        if not self.allowed(call, None):
            raise PermissionDenied(f"{call.ctx.principal.name} may not {call.method}")

    def check_batch(self, count: int) -> None:
        if count > self.max_batch:
            raise LimitExceeded(
                f"{count} items exceed the batch limit of {self.max_batch}", {"limit": self.max_batch}
            )

    def check_response(self, call: Call, size: int) -> None:
        """Before any work: refuse a call whose response could be ``size`` bytes,
        over the message limit (the connection refuses a larger response
        anyway, but only once the work is done); else announce that response
        to the connection (:meth:`RequestContext.expect_response`)."""
        if size > self.max_message:
            raise LimitExceeded(
                f"the response could be {size} bytes, over the message limit of {self.max_message} bytes",
                {"limit": self.max_message},
            )
        call.ctx.expect_response(size)

    def meta(self, call: Call, key: Key) -> dict[str, Any]:
        call.version = key.primary_version
        return self.service.metadata(key)

    async def _plugin_method(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        entry = self.extra[method]
        call = Call(ctx, method)
        try:
            if entry.key_param is None:
                self.authorize_no_key(call)
            else:
                await self.key_for(call, as_key_name(entry.key_param, params.get(entry.key_param)))
            result = await entry.handler(ctx, params)
        except Exception as exc:
            await self.record(call, *_failure(exc))
            raise
        await self.record(call, "allowed", None)
        return result

    # --- envelopes --------------------------------------------------------------

    def envelope_grant(
        self, call: Call, key: Key, version: int, allow_compromised: bool, op: str
    ) -> UseGrant:
        """May ``call`` open envelopes of ``key``'s ``version`` (as ``op``)?

        Raises:
            PermissionDenied: policy refuses it.
            DecryptionFailed: the key does not make envelopes.
            InvalidState: the version's state forbids opening data.
        """
        if not self.allowed(call, key.name, key, op):
            # Not naming the key: the caller brought only its envelope.
            raise PermissionDenied(f"{call.ctx.principal.name} may not {op} with this envelope's key")
        if key.type is not KeyType.AES256_GCM:
            raise DecryptionFailed()
        return self.service.process_grant(key, version, allow_compromised=allow_compromised)

    async def open_groups(
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
        denied = 0
        for (key_id, version), indexes in groups.items():
            try:
                key = await self.service.get_by_id(key_id)
                grant = self.envelope_grant(call, key, version, allow_compromised, op)
                call.alarm = call.alarm or grant.alarm
                ready.append((key, version, indexes))
            except BrokerError as exc:
                if isinstance(exc, PermissionDenied):
                    denied += len(indexes)
                wire = exc.to_wire()
                for index in indexes:
                    errors[index] = wire
        if denied:
            # The call succeeds with per-item errors; its record still shows the refusals.
            call.details["denied"] = denied
        if len(ready) == 1:
            call.key, call.version = ready[0][0].name, ready[0][1]
        elif ready:
            call.details["keys"] = len(ready)
        return ready, errors


def _failure(exc: Exception) -> tuple[str, str]:
    """The audit outcome and code of a call that raised ``exc``: a bug (in a
    plugin's policy or method, say) is recorded too, as ``internal``."""
    if isinstance(exc, PermissionDenied):
        return "denied", exc.code
    return "error", exc.code if isinstance(exc, BrokerError) else Internal.code


def _outcome(result: Any) -> tuple[str, str | None]:
    """The audit outcome and code of a call that returned or failed with ``result``."""
    if isinstance(result, BrokerError):
        return _failure(result)
    return "allowed", None


def _audit_fields(call: Call, outcome: str, code: str | None) -> dict[str, Any]:
    """The audit record of ``call`` as :meth:`AuditLog.record` arguments."""
    return {
        "principal": call.ctx.principal.name,
        "op": call.method,
        "outcome": outcome,
        "key": call.key,
        "version": call.version,
        "code": code,
        "alarm": call.alarm,
        "details": call.details or None,
    }
