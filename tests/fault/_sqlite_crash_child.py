"""Child process for the SQLite store crash test.

Usage: ``python _sqlite_crash_child.py DB_PATH ROUND``. Opens the store,
prints ``ready``, then changes keys named ``rNN/...`` through the store until
it is killed, printing one flushed acknowledgement line after each change
the store has committed:

    insert NAME REVISION
    replace NAME REVISION
    reserve NAME VERSION TOTAL_USES_OF_THAT_VERSION

Material is derived from the key name and version (:func:`material`), so the
parent can tell a torn blob from a whole one.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import trio
from keybroker_sqlite import SQLiteStore

from broker.keys import Classification, Key, KeyType
from broker.lifecycle import Transition, add_version, new_key, transition

# Small enough that reservations hit it within a round.
USE_LIMIT = 1000
START = 1_700_000_000


def material(name: str, version: int) -> bytes:
    """The material of ``version`` of key ``name``: longer than a page half the time."""
    seed = hashlib.sha256(f"{name}/{version}".encode()).digest()
    return seed * (4 if version % 2 else 200)


def ack(*fields: object) -> None:
    print(*fields, flush=True)


async def main(db_path: Path, round_no: int) -> None:
    rng = random.Random(round_no)
    store = SQLiteStore(db_path)
    await store.open()
    ack("ready")
    live: dict[str, Key] = {}
    uses: dict[tuple[str, int], int] = {}
    now = START
    for i in range(1_000_000):
        now += 1
        roll = rng.random()
        if not live or roll < 0.35:
            name = f"r{round_no:02d}/k{i:06d}"
            key = new_key(
                key_id=os.urandom(16),
                name=name,
                key_type=KeyType.AES256_GCM,
                protection="software",
                classification=Classification.INTERNAL,
                material=material(name, 1),
                now=now,
                max_uses_per_version=USE_LIMIT,
                labels={"round": str(round_no)},
            )
            await store.insert_key(key)
            live[name] = key
            ack("insert", name, key.revision)
            continue
        name = rng.choice(sorted(live))
        old = live[name]
        if roll < 0.7:
            new = add_version(old, material(name, old.primary_version + 1), now)
            await store.replace_key(new, expected_revision=old.revision)
            live[name] = new
            ack("replace", name, new.revision)
        elif roll < 0.9:
            version = old.primary_version
            granted = await store.reserve_uses(old.id, version, rng.randint(1, 80), USE_LIMIT)
            total = uses[name, version] = uses.get((name, version), 0) + granted
            ack("reserve", name, version, total)
        else:
            pending = transition(old, Transition.SCHEDULE_DESTROY, now, pending_days=7)
            await store.replace_key(pending, expected_revision=old.revision)
            ack("replace", name, pending.revision)
            destroyed = transition(pending, Transition.DESTROY, now + 7 * 86_400)
            await store.replace_key(destroyed, expected_revision=pending.revision)
            del live[name]
            ack("replace", name, destroyed.revision)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
