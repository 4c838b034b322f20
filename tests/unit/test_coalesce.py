"""The PKCS#11 coalescer's scheduling: who runs a shared loan when callers leave.

The pool here is scripted (each loan waits for a gate the test opens) so the
test can stop a loan at the moment a session is awaited; the PKCS#11 suite
runs the coalescer on SoftHSM2.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from keybroker_pkcs11.coalesce import Coalescer


class _GatedPool:
    """Loan number i waits for ``gates[i]`` (standing for a session to come free)."""

    size = 2
    wait_timeout_s = 5.0

    def __init__(self) -> None:
        self.gates = [trio.Event() for _ in range(4)]
        self.loans: list[list[int]] = []

    async def run(self, fn: Any) -> list[int]:
        gate = self.gates[len(self.loans)]
        self.loans.append(list(fn.args[1]))
        await gate.wait()
        result: list[int] = fn("lease")
        return result


def _work(lease: object, items: list[int]) -> list[int]:
    return [item * 10 for item in items]


async def test_a_caller_left_behind_by_a_cancelled_runner_is_served(
    mock_clock: trio.testing.MockClock,
) -> None:
    # R runs a loan; A and B queue behind it. R's next loan takes A and B and
    # waits for a session; A's caller leaves, then R is cancelled. B must be
    # served, and A's items not run for nobody. The clock stands still, so no
    # waiter starts a loan of its own when SPREAD_AFTER_S passes.
    pool = _GatedPool()
    coalescer: Coalescer[int, int] = Coalescer(pool)  # type: ignore[arg-type]
    results: dict[str, object] = {}
    scopes: dict[str, trio.CancelScope] = {}

    async def caller(name: str, item: int) -> None:
        with trio.CancelScope() as scope:
            scopes[name] = scope
            results[name] = await coalescer.run("key", [item], _work)
            return
        results[name] = "cancelled"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "R", 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller, "A", 2)
        await trio.testing.wait_all_tasks_blocked()  # A queues first, then B
        nursery.start_soon(caller, "B", 3)
        await trio.testing.wait_all_tasks_blocked()
        pool.gates[0].set()  # R's loan ends; its next one takes A and B
        await trio.testing.wait_all_tasks_blocked()
        assert pool.loans == [[1], [2, 3]]
        scopes["A"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        scopes["R"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.loans == [[1], [2, 3], [3]]  # B runs its own items, without A's
        pool.gates[2].set()
    assert results == {"R": "cancelled", "A": "cancelled", "B": [30]}
