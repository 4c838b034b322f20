"""SIGKILL a broker at random points of create/rotate loops, 20 times over:
every acknowledged change survives, no key is partial, the audit chain holds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.app import open_broker
from broker.audit import verify_audit_dir
from broker.config import parse_config
from broker.keys import VersionState
from tests.conftest import Caller

ROUNDS = 20
CHILD = Path(__file__).with_name("_crash_child.py")


def run_and_kill(data_dir: Path, round_no: int, rng: random.Random) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), str(round_no)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert child.stdout is not None
    first = child.stdout.readline()
    assert first == b"ready\n", (first, child.stderr.read() if child.stderr else b"")
    time.sleep(rng.uniform(0.05, 0.6))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    # A line cut by the kill was never fully acknowledged.
    return [line for line in out.decode().split("\n")[:-1] if line]


async def test_acknowledged_changes_survive_sigkill(short_tmp: Path, owner: str) -> None:
    data_dir = short_tmp / "data"
    rng = random.Random(1234)
    created: dict[str, str] = {}
    rotated: dict[str, int] = {}
    for round_no in range(ROUNDS):
        for line in run_and_kill(data_dir, round_no, rng):
            verb, name, value = line.split()
            if verb == "created":
                created[name] = value
            else:
                rotated[name] = max(rotated.get(name, 1), int(value))
    assert len(created) > ROUNDS, "the child should have acknowledged work in most rounds"
    assert verify_audit_dir(data_dir / "audit").ok
    async with open_broker(parse_config({}, data_dir=data_dir)) as broker:
        admin = Caller(broker, owner)
        for name, key_id in created.items():
            meta = await admin("key.get", name=name)
            assert meta["id"].hex() == key_id
            assert meta["primary_version"] >= rotated.get(name, 1)
        keys = await broker.store.list_keys(limit=100_000)
        for key in keys:
            # No partial key: every version from 1 to the primary, each with material.
            assert [v.number for v in key.versions] == list(range(1, key.primary_version + 1))
            assert all(v.material and v.state is VersionState.ACTIVE for v in key.versions)
        # And the recovered broker still works and audits.
        ct = (await admin("encrypt", key=next(iter(created)), plaintext=b"after"))["ciphertext"]
        assert (await admin("decrypt", ciphertext=ct))["plaintext"] == b"after"
    result = verify_audit_dir(data_dir / "audit")
    assert result.ok, result.reason
