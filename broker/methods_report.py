"""The ``report`` RPC: the compliance report of :mod:`broker.report`, from a running broker.

Params ``{since?: int (Unix seconds), days?: int}`` (at most one of them;
default the last 30 days) choose the audit period; the result is the JSON
report ``keybroker report`` prints (docs/report.md). Authorization is
``report`` on no key, which the built-in ``admin`` and ``auditor`` roles
have and ``app`` does not: the report names every key and principal.

Unlike the offline command, the RPC judges usage limits by this broker's
live counts (uses spent since the last store lease), and reads the keys
through the broker's own store connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from .audit import AUDIT_FILE_NAME
from .calls import TIME, Call, Kind, Method
from .errors import InvalidArgument
from .keys import Key
from .params import Field, as_int
from .report import build_report
from .report_cli import DAY, DEFAULT_DAYS, governance_of, load_all_keys, read_audit

if TYPE_CHECKING:
    from .rpc import Dispatcher

__all__ = ["REPORT_METHODS"]

# Ten years: a bound so a typo cannot ask for a scan from the epoch by accident.
MAX_DAYS = 3660


def _with_live_uses(key: Key, metadata: Mapping[str, Any]) -> Key:
    uses = {v["version"]: v["uses"] for v in metadata["versions"]}
    return replace(key, versions=tuple(replace(v, uses=uses.get(v.number, v.uses)) for v in key.versions))


async def _report(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d.authorize_no_key(call)
    if "since" in args and "days" in args:
        raise InvalidArgument("give since or days, not both", {"field": "days"})
    now = d.service.now()
    since = args.get("since", now - args.get("days", DEFAULT_DAYS) * DAY)
    if since > now:
        raise InvalidArgument("since lies in the future", {"field": "since"})
    keys = [_with_live_uses(k, d.service.metadata(k)) for k in await load_all_keys(d.service.store)]
    path = d.config.audit_dir / AUDIT_FILE_NAME
    stats = await trio.to_thread.run_sync(read_audit, path, since, now)
    report = build_report(
        keys, stats, now=now, governance=governance_of(d.plugins), node=d.config.node, audit_source=str(path)
    )
    call.details["keys"] = report["summary"]["keys"]
    call.details["violations"] = report["summary"]["violations"]
    return report


REPORT_METHODS: Mapping[str, Method] = {
    "report": Method({"since": TIME, "days": Field(as_int(1, MAX_DAYS))}, _report, Kind.READ),
}
