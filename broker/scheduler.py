"""The scheduler: rotations, activations, deactivations and destructions that fall due.

:func:`due_action` is pure: given a key and the time, what (if anything) is
due. :class:`Scheduler` applies due actions through the service, audited as
principal ``scheduler``. Every decision is derived from the stored key and
the clock, so a broker that was down does each due action once when it
comes back (a rotation missed for three periods happens once, and the next
falls due one period after it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import trio

from .audit import AuditLog
from .certs import DAY, certificates_to_warn, mark_warned, policy_of
from .errors import BrokerError
from .events import EventKind, KeyEvent
from .keys import Key, KeyState
from .lifecycle import Transition, next_rotation_at
from .metrics import Metrics
from .service import KeyService, NotDue

__all__ = ["Action", "Scheduler", "due_action"]

log = logging.getLogger("keybroker.scheduler")

PRINCIPAL = "scheduler"
# Keys read from the store per page while looking for due work.
PAGE = 500
# Certificates are looked at hourly: their expiry windows are days long.
CERT_CHECK_INTERVAL_S = 3600
# The pause after a pass is at least this many times the pass's duration.
PAUSE_PER_PASS_TIME = 20
# After an action on a key fails (its HSM unreachable, say), the key is left
# alone for RETRY_FIRST_S, then twice as long after each further failure, up
# to RETRY_MAX_S: retrying every pass would write two fsynced audit records a
# pass for as long as the failure lasts. A restart, a success, or the action
# no longer being due starts afresh.
RETRY_FIRST_S = 30
RETRY_MAX_S = 900


class Action(StrEnum):
    ROTATE = "key.rotate"
    ACTIVATE = "key.activate"
    DEACTIVATE = "key.deactivate"
    DESTROY = "key.destroy"


@dataclass(frozen=True, slots=True)
class Due:
    action: Action
    reason: str


def due_action(key: Key, now: int) -> Due | None:
    """The action due on ``key`` at ``now``, if any (at most one per look)."""
    if key.state is KeyState.DESTROY_PENDING and key.destroy_at is not None and key.destroy_at <= now:
        return Due(Action.DESTROY, "grace period over")
    if key.state is KeyState.PRE_ACTIVE and key.activate_at is not None and key.activate_at <= now:
        return Due(Action.ACTIVATE, "activate_at reached")
    if key.state is KeyState.ACTIVE and key.deactivate_at is not None and key.deactivate_at <= now:
        return Due(Action.DEACTIVATE, "deactivate_at reached")
    rotate_at = next_rotation_at(key)
    if rotate_at is not None and rotate_at <= now:
        return Due(Action.ROTATE, "rotation period elapsed")
    return None


_TRANSITION = {
    Action.ACTIVATE: Transition.ACTIVATE,
    Action.DEACTIVATE: Transition.DEACTIVATE,
    Action.DESTROY: Transition.DESTROY,
}


class Scheduler:
    """Finds and applies due actions.

    Args:
        service: the key service (its clock is the scheduler's clock).
        audit: where each automatic action is recorded.
        is_leader: whether this broker runs the schedule now (several
            brokers on one database elect one).
    """

    def __init__(
        self,
        service: KeyService,
        audit: AuditLog,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        metrics: Metrics | None = None,
    ) -> None:
        self.service = service
        self.audit = audit
        self.is_leader = is_leader
        self.metrics = metrics or Metrics()
        self._certs_checked_at = -CERT_CHECK_INTERVAL_S
        # Keys whose last action failed: (failures in a row, when to try again).
        self._retry: dict[str, tuple[int, int]] = {}

    async def run_once(self) -> int:
        """Apply everything due now; returns the number of actions applied.

        One key's failure is logged and audited and does not stop the rest.
        """
        if not self.is_leader():
            return 0
        applied = 0
        after: str | None = None
        while True:
            keys = await self.service.list_scheduled(limit=PAGE, after=after)
            for key in keys:
                applied += await self._apply_due(key)
            if len(keys) < PAGE:
                break
            after = keys[-1].name
        await self._certificates_expiring()
        return applied

    async def _certificates_expiring(self) -> None:
        """Announce issued certificates entering their expiry window, once each.

        At most every :data:`CERT_CHECK_INTERVAL_S` (certificates expire in
        days, not seconds); each announcement (a ``certificate_expiring`` key
        event on the CA key, and an audit record) is remembered in the
        certificate's inventory record, so a restart does not repeat it.
        """
        now = self.service.now()
        if now - self._certs_checked_at < CERT_CHECK_INTERVAL_S:
            return
        self._certs_checked_at = now
        try:
            window = policy_of(self.service).expiry_warning_days * DAY
            warnings = await certificates_to_warn(self.service, window)
        except BrokerError as exc:
            log.warning("certificate expiry check failed: %s", exc.code)
            return
        for record in warnings:
            ca = await self.service.find(record.ca_key)
            self.service.emit_event(
                KeyEvent(
                    record.ca_key,
                    EventKind.CERTIFICATE_EXPIRING,
                    record.ca_version,
                    now,
                    ca.state.value if ca is not None else "",
                    serial=record.serial,
                )
            )
            await self.audit.record(
                principal=PRINCIPAL,
                op="cert.expiring",
                outcome="allowed",
                key=record.ca_key,
                version=record.ca_version,
                details={"serial": record.serial, "not_after": record.not_after},
            )
            await mark_warned(self.service, record)

    async def _apply_due(self, key: Key) -> int:
        applied = 0
        failed = self._retry.get(key.name)
        if failed is not None and self.service.now() < failed[1]:
            return applied  # backing off (see RETRY_FIRST_S)
        # A key can owe several things (activate, then rotate): apply in turn.
        for _ in range(len(Action)):
            due = due_action(key, self.service.now())
            if due is None:
                self._retry.pop(key.name, None)
                return applied

            def still_due(fresh: Key, due: Due = due) -> bool:
                # The page was read earlier: the key may have changed since.
                return due_action(fresh, self.service.now()) == due

            # As for a client's change, its record is durable before the change is made.
            await self._record(key, due, "requested", None)
            try:
                if due.action is Action.ROTATE:
                    key = await self.service.rotate(key.name, only_if=still_due)
                else:
                    key = await self.service.lifecycle(key.name, _TRANSITION[due.action], only_if=still_due)
            except NotDue:
                log.info("scheduled %s of %s: no longer due", due.action.value, key.name)
                self._retry.pop(key.name, None)
                await self._record(key, due, "error", "invalid_state")
                return applied
            except BrokerError as exc:
                self.metrics.scheduler_actions.labels(due.action.value, exc.code).inc()
                failures = self._retry.get(key.name, (0, 0))[0] + 1
                wait = min(RETRY_FIRST_S << min(failures - 1, 16), RETRY_MAX_S)
                self._retry[key.name] = (failures, self.service.now() + wait)
                log.warning("scheduled %s of %s failed: %s; next try in %d s",
                            due.action.value, key.name, exc.code, wait)
                await self._record(key, due, "error", exc.code)
                return applied
            self._retry.pop(key.name, None)
            self.metrics.scheduler_actions.labels(due.action.value, "ok").inc()
            applied += 1
            await self._record(key, due, "allowed", None)
        return applied

    async def _record(self, key: Key, due: Due, outcome: str, code: str | None) -> None:
        await self.audit.record(
            principal=PRINCIPAL,
            op=due.action.value,
            outcome=outcome,
            key=key.name,
            version=key.primary_version,
            code=code,
            details={"reason": due.reason},
        )

    async def run(
        self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Look for due work every ``interval_s`` seconds until cancelled.

        A pass reads the keys time can make due (:func:`broker.store.is_scheduled`),
        so with very many of them it takes a while; the pause after a pass is
        then stretched to :data:`PAUSE_PER_PASS_TIME` times its length, which
        keeps the scheduler to a few percent of the broker's time whatever
        the number of keys (due work is applied that much later).
        """
        task_status.started()
        while True:
            started = trio.current_time()
            try:
                await self.run_once()
            except BrokerError as exc:
                # The store may be unavailable for a while; try again next time.
                log.warning("scheduler pass failed: %s", exc.code)
            await trio.sleep(max(interval_s, (trio.current_time() - started) * PAUSE_PER_PASS_TIME))
