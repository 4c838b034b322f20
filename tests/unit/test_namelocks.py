"""broker.namelocks: one lock per name, dropped once nobody holds or waits for it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.namelocks import NameLocks


async def test_one_holder_per_name_and_names_are_independent() -> None:
    locks = NameLocks()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    order: list[str] = []

    async def use(name: str, tag: str) -> None:
        async with locks(name):
            inside[name] += 1
            most[name] = max(most[name], inside[name])
            order.append(tag)
            await trio.sleep(0.01)
            inside[name] -= 1

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(use, "a", f"a{i}")
            nursery.start_soon(use, "b", f"b{i}")
        await trio.sleep(0.005)
        assert locks.active == 2  # both names in use at once
    assert most == {"a": 1, "b": 1}
    assert sorted(order) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert locks.active == 0  # nothing kept once released


async def test_a_waiter_cancelled_leaves_no_entry_and_no_lock() -> None:
    locks = NameLocks()
    release = trio.Event()

    async def hold() -> None:
        async with locks("k"):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01) as waited:
            async with locks("k"):
                pytest.fail("the lock was held by another task")
        assert waited.cancelled_caught
        assert locks.active == 1  # the holder's
        release.set()
    assert locks.active == 0
    async with locks("k"):  # free again
        assert locks.active == 1


async def test_an_error_inside_releases_the_name() -> None:
    locks = NameLocks()
    with pytest.raises(RuntimeError):
        async with locks("k"):
            raise RuntimeError("boom")
    assert locks.active == 0
    with trio.fail_after(1):
        async with locks("k"):
            pass


async def test_a_free_name_is_taken_without_yielding_and_a_busy_one_waits() -> None:
    """Nobody else on the name: no trip through the scheduler. Someone else: the second waits its turn."""
    locks = NameLocks()
    with trio.testing.assert_no_checkpoints():
        async with locks("free"):
            assert locks.active == 1
    assert locks.active == 0
    order: list[str] = []

    async def second() -> None:
        async with locks("k"):
            order.append("second")

    async with trio.open_nursery() as nursery, locks("k"):
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and locks.active == 1
        order.append("first")
    assert order == ["first", "second"] and locks.active == 0
