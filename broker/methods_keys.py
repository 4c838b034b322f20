"""Key management methods: create, read, rotate, update, lifecycle, approvals, events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import __version__
from .calls import NAME, PERIOD, PREFIX, TIME, USES, VERSION, Call, Handler, Kind, Method, as_key_name
from .errors import ApprovalRequired, BrokerError, InvalidArgument, PermissionDenied
from .keys import Classification, Key, KeyState, KeyType
from .lifecycle import Transition, transition
from .params import Field, Spec, as_bool, as_enum, as_int, as_labels, as_str
from .policy import AuthzRequest

if TYPE_CHECKING:
    from .rpc import Dispatcher

__all__ = ["KEY_METHODS", "PROTOCOL_VERSION", "target"]

PROTOCOL_VERSION = 1


def target(args: Mapping[str, Any]) -> str | None:
    name = args.get("name")
    return name if isinstance(name, str) else None


async def _ping(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    return {"version": __version__, "protocol": PROTOCOL_VERSION, "node": d.config.node}


async def _whoami(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = call.ctx.principal.name
    return {"principal": name, "roles": d.plugins.roles(name)}


async def _key_create(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = args["name"]  # a key name: the NAME field checked it
    call.key = name
    if not d.allowed(call, name):
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
    return d.meta(call, key)


async def _key_get(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    return d.meta(call, await d.key_for(call, args["name"]))


async def _key_list(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d.authorize_no_key(call)
    limit, after = args["limit"], args.get("cursor")
    # Pages are read until `limit` keys the caller may see are found (or the
    # store ends), and the cursor is the last of those: a cursor naming a key
    # the caller may not see would tell it that key's name.
    visible: list[Key] = []
    while len(visible) < limit:
        page = await d.service.list_keys(
            prefix=args["prefix"], state=args.get("state"), limit=limit, after=after
        )
        for key in page:
            if d.allowed(call, key.name, key, "key.get"):
                visible.append(key)
                if len(visible) == limit:
                    break
        if len(page) < limit:
            break
        after = page[-1].name
    cursor = visible[-1].name if len(visible) == limit else None
    call.details["count"] = len(visible)
    return {"keys": [d.service.metadata(k) for k in visible], "cursor": cursor}


async def _key_rotate(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    await d.key_for(call, args["name"])
    return d.meta(call, await d.service.rotate(args["name"]))


async def _key_update(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = args.pop("name")
    await d.key_for(call, name)
    return d.meta(call, await d.service.update(name, **args))


def _lifecycle(transition: Transition) -> Handler:
    async def run(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
        await d.key_for(call, args["name"])
        key = await d.service.lifecycle(args["name"], transition, pending_days=args.get("pending_days"))
        return d.meta(call, key)

    return run


async def _key_schedule_destroy(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["name"])
    # What could never be carried out (a destroy_pending key, pending_days out
    # of range) is refused before anyone is asked to approve it.
    transition(key, Transition.SCHEDULE_DESTROY, d.service.now(), pending_days=args["pending_days"])
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
    return d.meta(call, key)


async def _approve(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    request = d.approvals.get(args["request_id"])
    call.details["request_id"] = request.id
    await d.key_for(call, request.key)
    # An approver who names the key learns of a request id for another key
    # before approving it, rather than trusting whoever handed them the id.
    if "name" in args and args["name"] != request.key:
        raise InvalidArgument("the request is for another key; nothing was approved", {"field": "name"})
    request = d.approvals.approve(request.id, call.ctx.principal.name)
    call.details["approvals"] = len(request.approvers)
    if request.done:
        # The approved action runs as the requester asked it. Its record's
        # principal is the last approver, whose call carried it out; its
        # details name the requester and every approver.
        action = Call(call.ctx, request.op, key=request.key)
        action.details = {"approved_by": ",".join(sorted(request.approvers)), "requester": request.requester}
        try:
            key = await d.service.lifecycle(
                request.key, Transition.SCHEDULE_DESTROY, pending_days=request.params["pending_days"]
            )
        except BrokerError as exc:
            await d.record(action, "error", exc.code)
            raise
        action.version = key.primary_version
        await d.record(action, "allowed", None)
    return {**request.summary(), **request.describe()}


async def _subscribe(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d.authorize_no_key(call)
    principal = call.ctx.principal.name

    def visible(name: str) -> bool:
        return d.plugins.authorize(AuthzRequest(principal=principal, operation="key.get", key=name))

    call.ctx.keep_open = True
    d.subscriptions.add(call.ctx, args["prefix"], visible)
    call.details["prefix"] = args["prefix"]
    return {}


async def _key_compromise(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    await d.key_for(call, args["name"])
    key = await d.service.compromise(args["name"], args.get("version"))
    call.alarm = True
    return d.meta(call, key)


async def _key_public(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    key = await d.key_for(call, args["name"])
    version, pem = await d.service.public_pem(key, args.get("version"))
    call.version = version
    return {"pem": pem.decode("ascii"), "version": version}


_NAME_ONLY: Spec = {"name": NAME}

KEY_METHODS: Mapping[str, Method] = {
    "ping": Method({}, _ping, Kind.READ, audited=False),
    "whoami": Method({}, _whoami, Kind.READ, audited=False),
    "key.create": Method(
        {
            "name": NAME,
            "type": Field(as_enum(KeyType), required=True),
            "protection": Field(as_str, default="software"),
            "classification": Field(as_enum(Classification), default=Classification.INTERNAL),
            "rotation_period_s": PERIOD,
            "max_uses_per_version": USES,
            "activate": Field(as_bool, default=True),
            "exportable": Field(as_bool, default=False),
            "labels": Field(as_labels),
            "activate_at": TIME,
            "deactivate_at": TIME,
        },
        _key_create,
        Kind.CHANGE,
    ),
    "key.get": Method(_NAME_ONLY, _key_get, Kind.READ),
    "key.list": Method(
        {
            "prefix": PREFIX,
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
            "name": NAME,
            "rotation_period_s": PERIOD,
            "max_uses_per_version": USES,
            "min_decrypt_version": VERSION,
            "labels": Field(as_labels),
            "activate_at": TIME,
            "deactivate_at": TIME,
        },
        _key_update,
        Kind.CHANGE,
    ),
    "key.activate": Method(_NAME_ONLY, _lifecycle(Transition.ACTIVATE), Kind.CHANGE),
    "key.deactivate": Method(_NAME_ONLY, _lifecycle(Transition.DEACTIVATE), Kind.CHANGE),
    "key.disable": Method(_NAME_ONLY, _lifecycle(Transition.DISABLE), Kind.CHANGE),
    "key.enable": Method(_NAME_ONLY, _lifecycle(Transition.ENABLE), Kind.CHANGE),
    "key.compromise": Method({"name": NAME, "version": VERSION}, _key_compromise, Kind.CHANGE),
    "key.schedule_destroy": Method(
        {"name": NAME, "pending_days": Field(as_int(7, 30), default=30)},
        _key_schedule_destroy,
        Kind.CHANGE,
    ),
    "key.cancel_destroy": Method(_NAME_ONLY, _lifecycle(Transition.CANCEL_DESTROY), Kind.CHANGE),
    "key.public": Method({"name": NAME, "version": VERSION}, _key_public, Kind.READ),
    "approve": Method(
        {"request_id": Field(as_str, required=True), "name": Field(as_key_name)}, _approve, Kind.CHANGE
    ),
    "subscribe": Method({"prefix": PREFIX}, _subscribe),
}
