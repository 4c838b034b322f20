"""keybroker_auditlog.FileAuditSink on real files, driven through broker.audit.open_audit_log."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import keybroker_auditlog
import pluggy
import pytest
import trio
from keybroker_auditlog import FileAuditSink

import broker.hookspecs
from broker.audit import (
    AUDIT_FILE_NAME,
    AuditRecord,
    AuditSink,
    StagedAuditSink,
    audit_verify_main,
    open_audit_log,
    verify_audit_dir,
)
from broker.config import Config
from broker.errors import Unavailable


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def open_umask() -> Iterator[None]:
    # The sink must not depend on the umask for its modes.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def log_lines(audit_dir: Path) -> list[bytes]:
    with (audit_dir / AUDIT_FILE_NAME).open("rb") as fh:
        return list(fh)


async def write_records(audit_dir: Path, n: int, *, op: str = "encrypt") -> list[AuditRecord]:
    async with open_audit_log([FileAuditSink(audit_dir)], node="n1") as log:
        return [await log.record(principal="uid:1000", op=op, outcome="allowed", key="k", version=1)
                for _ in range(n)]


async def test_creates_private_dir_and_file(audit_dir: Path, open_umask: None) -> None:
    records = await write_records(audit_dir, 3)
    assert mode(audit_dir) == 0o700
    assert mode(audit_dir / AUDIT_FILE_NAME) == 0o600
    assert log_lines(audit_dir) == [r.to_json_line() for r in records]
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 3


async def test_reopen_continues_the_chain(audit_dir: Path) -> None:
    first = await write_records(audit_dir, 2)
    second = await write_records(audit_dir, 2)
    assert [r.seq for r in second] == [3, 4]
    assert second[0].prev == first[-1].hash
    assert verify_audit_dir(audit_dir).records == 4


async def test_group_commit_on_disk(audit_dir: Path) -> None:
    n = 40
    sink = FileAuditSink(audit_dir)
    async with open_audit_log([sink], node="n1") as log:

        async def one(i: int) -> None:
            record = await log.record(principal=f"uid:{i}", op="encrypt", outcome="allowed")
            # Durable on return: already on disk, not just queued.
            assert record.to_json_line() in log_lines(audit_dir)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        assert log.writes < n
    assert verify_audit_dir(audit_dir).records == n


async def test_torn_last_line_is_set_aside_and_noted(audit_dir: Path, open_umask: None) -> None:
    await write_records(audit_dir, 3)
    torn = b'{"alarm":false,"code":null,"details":{},"hash":"ab'
    with (audit_dir / AUDIT_FILE_NAME).open("ab") as fh:
        fh.write(torn)
    assert not verify_audit_dir(audit_dir).ok  # as the crash left it

    after = await write_records(audit_dir, 1)
    lines = log_lines(audit_dir)
    note = AuditRecord.from_json(json.loads(lines[3]))
    assert (note.seq, note.op, note.outcome, note.principal, note.alarm) == (
        4, "audit.recover", "recovered", "keybroker", False)
    assert note.details["set_aside_bytes"] == len(torn)
    assert note.details["set_aside_lines"] == 0
    aside = Path(str(note.details["set_aside_to"]))
    assert aside.parent == audit_dir and aside.name.startswith("torn-") and aside.suffix == ".bin"
    assert aside.read_bytes() == torn
    assert mode(aside) == 0o600
    assert after[0].seq == 5 and after[0].prev == note.hash
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 5  # torn bytes are not part of the chain

    out = io.StringIO()
    assert audit_verify_main(audit_dir.parent, out) == 0
    assert "audit chain intact: 5 records" in out.getvalue()
    assert aside.name in out.getvalue()


async def test_damaged_complete_lines_are_set_aside_as_an_alarm(audit_dir: Path) -> None:
    records = await write_records(audit_dir, 2)
    with (audit_dir / AUDIT_FILE_NAME).open("ab") as fh:
        fh.write(b"garbage\n" + records[0].to_json_line().replace(b"uid:1000", b"uid:0000") + b"{")
    await write_records(audit_dir, 1)
    note = AuditRecord.from_json(json.loads(log_lines(audit_dir)[2]))
    assert note.op == "audit.recover" and note.alarm
    assert note.details["set_aside_lines"] == 2
    assert verify_audit_dir(audit_dir).records == 4
    # The chain links up again, but whole records went missing from its end:
    # no crash does that, so verification says the log was altered.
    out = io.StringIO()
    assert audit_verify_main(audit_dir.parent, out) == 1
    assert "audit chain intact: 4 records" in out.getvalue()
    assert "ALTERED: 2 complete record(s) were set aside" in out.getvalue()


async def test_records_cut_off_the_end_fail_against_a_kept_hash(audit_dir: Path) -> None:
    await write_records(audit_dir, 5)
    out = io.StringIO()
    assert audit_verify_main(audit_dir.parent, out) == 0
    kept = out.getvalue().split("last hash: ")[1].split()[0]
    path = audit_dir / AUDIT_FILE_NAME
    path.write_bytes(b"".join(log_lines(audit_dir)[:3]))  # the last two records cut off
    assert audit_verify_main(audit_dir.parent, io.StringIO()) == 0  # a chain cannot tell alone
    out = io.StringIO()
    assert audit_verify_main(audit_dir.parent, out, expect_hash=kept) == 1
    assert f"no record has the expected hash {kept}" in out.getvalue()
    await write_records(audit_dir, 4)  # growing past it again does not bring it back
    assert audit_verify_main(audit_dir.parent, io.StringIO(), expect_hash=kept) == 1
    earlier = AuditRecord.from_json(json.loads(log_lines(audit_dir)[1])).hash
    assert audit_verify_main(audit_dir.parent, io.StringIO(), expect_hash=earlier) == 0


async def test_log_with_no_complete_record(audit_dir: Path) -> None:
    audit_dir.mkdir(mode=0o700)
    (audit_dir / AUDIT_FILE_NAME).write_bytes(b'{"alarm":')
    (record,) = await write_records(audit_dir, 1)
    assert record.seq == 2
    assert verify_audit_dir(audit_dir).records == 2


def _failing_write(fd: int, data: bytes) -> None:
    # Half the batch reaches the file, then the disk is full.
    os.write(fd, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


# None: every record is written with fsync; 0.01: staged appends (the default).
SYNC_MODES = pytest.mark.parametrize("sync_interval", [None, 0.01], ids=["always", "staged"])


@SYNC_MODES
async def test_disk_full_is_unavailable_then_recovers(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch, sync_interval: float | None
) -> None:
    async with open_audit_log([FileAuditSink(audit_dir)], node="n1", sync_interval=sync_interval) as log:
        ok = await log.record(principal="p", op="a", outcome="allowed")
        size = (audit_dir / AUDIT_FILE_NAME).stat().st_size
        monkeypatch.setattr(keybroker_auditlog, "_write_all", _failing_write)
        for durable in (True, False):
            with pytest.raises(Unavailable):
                await log.record(principal="p", op="lost", outcome="allowed", durable=durable)
            assert (audit_dir / AUDIT_FILE_NAME).stat().st_size == size  # partial append rolled back
        assert not log.healthy
        monkeypatch.undo()
        again = await log.record(principal="p", op="b", outcome="allowed")
        assert log.healthy
    assert (again.seq, again.prev) == (2, ok.hash)
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 2


@SYNC_MODES
async def test_failed_rollback_is_repaired_before_next_write(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch, sync_interval: float | None
) -> None:
    async with open_audit_log([FileAuditSink(audit_dir)], node="n1", sync_interval=sync_interval) as log:
        await log.record(principal="p", op="a", outcome="allowed")
        monkeypatch.setattr(keybroker_auditlog, "_write_all", _failing_write)

        def no_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "ftruncate", no_truncate)
        with pytest.raises(Unavailable):
            await log.record(principal="p", op="lost", outcome="allowed")
        monkeypatch.undo()
        assert not verify_audit_dir(audit_dir).ok  # half a batch is still on disk...
        await log.record(principal="p", op="b", outcome="allowed")
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 2  # ...until the next write cuts it off first


async def test_second_broker_on_same_log_is_refused(audit_dir: Path) -> None:
    async with open_audit_log([FileAuditSink(audit_dir)], node="n1") as log:
        await log.record(principal="p", op="a", outcome="allowed")
        with pytest.raises(BlockingIOError, match="in use"):
            async with open_audit_log([FileAuditSink(audit_dir)], node="n2"):
                pass
    await write_records(audit_dir, 1)  # lock released on close


async def test_tampered_file_fails_verify(audit_dir: Path) -> None:
    await write_records(audit_dir, 4)
    path = audit_dir / AUDIT_FILE_NAME
    data = bytearray(path.read_bytes())
    third = data.index(b'"seq":3')
    data[third + 6] = ord("7")
    path.write_bytes(bytes(data))
    out = io.StringIO()
    assert audit_verify_main(audit_dir.parent, out) == 1
    assert out.getvalue().startswith("audit chain broken at record/line 3: ")


def test_plugin_provides_the_primary_file_sink(tmp_path: Path) -> None:
    pm = pluggy.PluginManager(broker.hookspecs.PROJECT)
    pm.add_hookspecs(broker.hookspecs)
    pm.register(keybroker_auditlog)
    config = Config(data_dir=tmp_path, socket_path=tmp_path / "keybroker.sock")
    (sinks,) = pm.hook.kb_audit_sinks(config=config)
    (sink,) = sinks
    assert isinstance(sink, FileAuditSink)
    as_protocol: AuditSink = sink  # checked by mypy: the sink satisfies the protocol
    assert as_protocol.name == "file"
    assert sink.primary
    assert sink.path == tmp_path / "audit" / AUDIT_FILE_NAME


class GatedSink(FileAuditSink):
    """The file sink whose fsyncs (staged or not) wait for the test to open a gate; syncs are counted."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = trio.Event()
        self.syncs = 0
        self.fail_syncs = False

    async def write(self, records: Sequence[AuditRecord]) -> None:
        await self.gate.wait()
        await super().write(records)

    async def sync(self) -> None:
        await self.gate.wait()
        if self.fail_syncs:
            raise OSError(errno.EIO, "Input/output error")
        await super().sync()
        self.syncs += 1


async def test_staged_records_are_in_the_file_before_the_fsync(audit_dir: Path) -> None:
    sink = GatedSink(audit_dir)
    assert isinstance(sink, StagedAuditSink)
    async with open_audit_log([sink], node="n1", sync_interval=0.01) as log:
        used = [await log.record(principal="p", op="encrypt", outcome="allowed", durable=False)
                for _ in range(3)]
        # Answered with the gate shut: appended (a broker crash keeps them), not yet fsynced.
        assert log_lines(audit_dir) == [r.to_json_line() for r in used]
        assert sink.syncs == 0
        changed: list[AuditRecord] = []

        async def change() -> None:
            changed.append(await log.record(principal="p", op="key.create", outcome="allowed"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change)
            await trio.sleep(0.05)
            assert changed == []  # a durable record waits for its fsync
            sink.gate.set()
        assert sink.syncs >= 1
        assert changed[0].seq == 4
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 4


async def test_staged_records_are_fsynced_within_the_interval(audit_dir: Path) -> None:
    sink = GatedSink(audit_dir)
    sink.gate.set()
    async with open_audit_log([sink], node="n1", sync_interval=0.02) as log:
        for _ in range(50):
            await log.record(principal="p", op="encrypt", outcome="allowed", durable=False)
        with trio.fail_after(2):
            while sink.syncs == 0:
                await trio.sleep(0.005)
        assert sink.syncs <= 2  # one fsync for the burst, not one per record
        await trio.sleep(0.1)
        syncs = sink.syncs
        await trio.sleep(0.1)
        assert sink.syncs == syncs  # nothing new, no fsync
    assert verify_audit_dir(audit_dir).records == 50


async def test_staged_fsync_failure_fails_durable_records_then_recovers(audit_dir: Path) -> None:
    sink = GatedSink(audit_dir)
    sink.gate.set()
    sink.fail_syncs = True
    async with open_audit_log([sink], node="n1", sync_interval=0.01) as log:
        await log.record(principal="p", op="encrypt", outcome="allowed", durable=False)
        with pytest.raises(Unavailable):
            await log.record(principal="p", op="key.create", outcome="allowed")
        assert not log.healthy
        sink.fail_syncs = False
        again = await log.record(principal="p", op="key.create", outcome="allowed")
        assert log.healthy and again.seq == 3
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 3


async def test_staged_log_fsyncs_what_is_left_on_close(audit_dir: Path) -> None:
    sink = GatedSink(audit_dir)
    sink.gate.set()
    async with open_audit_log([sink], node="n1", sync_interval=10.0) as log:
        await log.record(principal="p", op="encrypt", outcome="allowed", durable=False)
        assert sink.syncs == 0
    assert sink.syncs == 1


async def test_a_failed_fsync_writes_the_unsynced_records_again(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the pages it could not
    write: the sink writes its unsynced records again before it syncs."""
    real = keybroker_auditlog.fdatasync
    failures: list[int] = []

    async def loses_the_pages_once(fd: int) -> None:
        if not failures:
            size = os.fstat(fd).st_size
            failures.append(size)
            # What a crash would find where the pages were (through a descriptor
            # of its own: on the sink's O_APPEND one, pwrite appends).
            side = os.open(audit_dir / AUDIT_FILE_NAME, os.O_WRONLY)
            os.pwrite(side, b"\0" * 200, size - 200)
            os.close(side)
            raise OSError(errno.EIO, "Input/output error")
        await real(fd)

    monkeypatch.setattr(keybroker_auditlog, "fdatasync", loses_the_pages_once)
    async with open_audit_log([FileAuditSink(audit_dir)], node="n1", sync_interval=0.01) as log:
        for _ in range(3):
            await log.record(principal="p", op="encrypt", outcome="allowed", durable=False)
        await log.record(principal="p", op="key.create", outcome="allowed")  # durable: waits for the sync
    assert failures
    result = verify_audit_dir(audit_dir)
    assert result.ok and result.records == 4
