"""A real full disk (a small tmpfs as the data directory) under the store and
the audit log: requests fail with ``unavailable``, nothing acknowledged is
lost, nothing happens unaudited, and service resumes when space returns."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.app import open_broker
from broker.audit import verify_audit_dir
from broker.config import parse_config
from broker.errors import BrokerError
from tests.conftest import Caller, require

TMPFS_SIZE = "6m"


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(where)],
        capture_output=True, check=False,
    ).returncode == 0
    require(mounted, "a tmpfs mount (root) for a real full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write until the disk says it is full."""
    chunk = b"\0" * 65536
    with path.open("wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def expect_unavailable(call: object) -> None:
    with pytest.raises(BrokerError) as info:
        await call  # type: ignore[misc]
    assert info.value.code == "unavailable", info.value.message


@pytest.mark.parametrize("fail_open_reads", [False, True])
async def test_full_disk_fails_closed_and_recovers(
    short_tmp: Path, owner: str, fail_open_reads: bool
) -> None:
    with small_disk(short_tmp / "disk") as disk:
        data = disk / "data"
        config = parse_config({"audit": {"fail_open_reads": fail_open_reads}}, data_dir=data)
        async with open_broker(config, run_scheduler=False) as broker:
            admin = Caller(broker, owner)
            await admin("key.create", name="before", type="aes256-gcm")
            sealed = (await admin("encrypt", key="before", plaintext=b"kept"))["ciphertext"]

            fill(disk / "filler")
            # The audit file's last block may still hold a few records; once
            # it is full, every use fails and its result is withheld.
            served = 0
            for _ in range(500):
                try:
                    await admin("encrypt", key="before", plaintext=b"x")
                except BrokerError as exc:
                    assert exc.code == "unavailable", exc.message
                    break
                served += 1
            else:
                pytest.fail("the audit log kept accepting records on a full disk")
            await expect_unavailable(admin("encrypt", key="before", plaintext=b"x"))
            await expect_unavailable(admin("key.create", name="during", type="aes256-gcm"))
            await expect_unavailable(admin("key.rotate", name="before"))
            await expect_unavailable(admin("decrypt", ciphertext=sealed))
            if fail_open_reads:
                assert (await admin("key.get", name="before"))["primary_version"] == 1
            else:
                await expect_unavailable(admin("key.get", name="before"))

            (disk / "filler").unlink()
            # Space is back: service resumes, and what failed never happened.
            assert (await admin("key.get", name="before"))["primary_version"] == 1
            with pytest.raises(BrokerError) as info:
                await admin("key.get", name="during")
            assert info.value.code == "not_found"
            await admin("key.create", name="after", type="aes256-gcm")
            assert (await admin("decrypt", ciphertext=sealed))["plaintext"] == b"kept"
        assert verify_audit_dir(data / "audit").ok
        records = (data / "audit" / "audit.jsonl").read_bytes().count(b'"op":"encrypt","outcome":"allowed"')
        assert records == 1 + served  # every acknowledged use is on record
        async with open_broker(config, run_scheduler=False) as broker:
            admin = Caller(broker, owner)
            names = [k["name"] for k in (await admin("key.list"))["keys"]]
            assert names == ["after", "before"]
