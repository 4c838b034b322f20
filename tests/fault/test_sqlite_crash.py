"""SIGKILL the SQLite store mid-write, over and over: no acknowledged change is lost, no key is torn.

A child process (``_sqlite_crash_child.py``) creates, rotates, reserves and
destroys keys through :class:`SQLiteStore`, acknowledging each committed
change on stdout. The parent kills it at a random moment, reopens the store
and checks every key against the acknowledgements and against the shape the
workload gives a whole key.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from types import ModuleType

import pytest
import trio
from keybroker_sqlite import SQLiteStore

from broker.keys import Key, KeyState, VersionState

CHILD = Path(__file__).with_name("_sqlite_crash_child.py")
REPO = Path(__file__).resolve().parents[2]
ROUNDS = 20
# Long enough to land inside a stream of transactions, short enough that 20
# rounds (plus a child start-up each) stay well under a minute.
MIN_DELAY_S, MAX_DELAY_S = 0.02, 0.4


def _load_child() -> ModuleType:
    # Loaded by path: tests/fault is not a package.
    spec = importlib.util.spec_from_file_location("_sqlite_crash_child", CHILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child()


class Acks:
    """What the children acknowledged, across rounds."""

    def __init__(self) -> None:
        self.revision: dict[str, int] = {}
        self.uses: dict[tuple[str, int], int] = {}

    def record(self, line: str) -> None:
        kind, name, *rest = line.split()
        if kind in ("insert", "replace"):
            self.revision[name] = int(rest[0])
        elif kind == "reserve":
            self.uses[name, int(rest[0])] = int(rest[1])
        else:
            raise AssertionError(f"unexpected line from the child: {line!r}")


def run_child(db_path: Path, round_no: int, delay: float) -> list[str]:
    """Run one child, SIGKILL it ``delay`` seconds after it is ready; its complete lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db_path), str(round_no)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready == b"ready\n", f"child did not start: {ready!r}"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child stopped before it was killed"
    # A line cut short by the kill was never an acknowledgement.
    return out.decode("ascii").split("\n")[:-1]


async def load_all(db_path: Path) -> list[Key]:
    store = SQLiteStore(db_path)
    await store.open()
    try:
        found: list[Key] = []
        while page := await store.list_keys(after=found[-1].name if found else None, limit=500):
            found.extend(page)
        return found
    finally:
        await store.aclose()


def check_whole(key: Key) -> None:
    """The shape the child's workload gives every key it wrote completely."""
    numbers = [v.number for v in key.versions]
    assert numbers == list(range(1, key.primary_version + 1)), f"{key.name}: versions {numbers}"
    extra = {KeyState.ACTIVE: 0, KeyState.DESTROY_PENDING: 1, KeyState.DESTROYED: 2}[key.state]
    assert key.revision == key.primary_version + extra, f"{key.name}: revision {key.revision}"
    for v in key.versions:
        assert v.uses <= child.USE_LIMIT
        if key.state is KeyState.DESTROYED:
            assert v.state is VersionState.DESTROYED and v.material == b"", (
                f"{key.name} v{v.number}: not erased"
            )
        else:
            assert v.material == child.material(key.name, v.number), f"{key.name} v{v.number}: torn"


def check(keys: list[Key], acks: Acks) -> None:
    by_name = {k.name: k for k in keys}
    lost = sorted(set(acks.revision) - set(by_name))
    assert not lost, f"acknowledged keys missing after the crash: {lost[:5]}"
    # The kill may land between a commit and its acknowledgement: at most one
    # change per round is visible without an ack.
    unacked: Counter[str] = Counter()
    for key in keys:
        check_whole(key)
        round_tag = key.name.split("/")[0]
        acked = acks.revision.get(key.name)
        if acked is None:
            assert key.revision == 1, f"{key.name}: unacknowledged key past its insert"
            unacked[round_tag] += 1
        else:
            assert key.revision in (acked, acked + 1), f"{key.name}: revision {key.revision}, acked {acked}"
            unacked[round_tag] += key.revision - acked
        for v in key.versions:
            acked_uses = acks.uses.get((key.name, v.number), 0)
            assert v.uses >= acked_uses, f"{key.name} v{v.number}: reserved uses went back"
            unacked[round_tag] += v.uses > acked_uses
    assert all(n <= 1 for n in unacked.values()), f"unacknowledged changes per round: {unacked}"


@pytest.mark.slow
def test_acknowledged_changes_survive_sigkill(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db_path = tmp_path / "data" / "keys.db"
    acks = Acks()
    for round_no in range(ROUNDS):
        lines = run_child(db_path, round_no, rng.uniform(MIN_DELAY_S, MAX_DELAY_S))
        for line in lines:
            acks.record(line)
        context = f"seed {seed}, round {round_no}"
        keys = trio.run(load_all, db_path)
        try:
            check(keys, acks)
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from exc
        with closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], context
    assert len(acks.revision) >= ROUNDS, "the children made too few changes to test anything"
