"""broker.durable.fdatasync: a flush on a native thread, reported through an eventfd."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from broker import durable
from broker._native import lib
from broker.durable import fdatasync, flush, sync_directory

pytestmark = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the native flush is Linux-only")


@pytest.fixture
def a_pipe() -> Iterator[int]:
    """A descriptor fdatasync refuses (EINVAL), reported by the flushing thread."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(read_end)
    os.close(write_end)


@pytest.fixture
def log_fd(tmp_path: Path) -> Iterator[int]:
    """A file open for writing (and flushing), closed after the test."""
    fd = os.open(tmp_path / "log", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settled_fd_count(baseline: int) -> int:
    # Each flushing thread closes its duplicates just after reporting.
    with trio.move_on_after(2):
        while _open_fds() > baseline:
            await trio.sleep(0.005)
    return _open_fds()


async def test_flushes_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"record\n")
        await fdatasync(fd)
        flush(fd)  # the blocking twin accepts the same descriptor
    finally:
        os.close(fd)
    assert path.read_bytes() == b"record\n"


@pytest.mark.parametrize(
    ("make_fd", "code"),
    [
        (lambda: os.pipe()[0], errno.EINVAL),  # reported by the flushing thread
        (lambda: 2**20, errno.EBADF),  # refused before any thread starts
    ],
    ids=["pipe", "closed"],
)
async def test_failures_raise_the_flush_errno(make_fd: object, code: int) -> None:
    fd = make_fd()  # type: ignore[operator]
    with pytest.raises(OSError) as info:
        await fdatasync(fd)
    assert info.value.errno == code


async def test_many_flushes_at_once_all_finish_and_leave_only_the_kept_eventfds(log_fd: int) -> None:
    os.write(log_fd, b"x")
    durable._forget_idle_eventfds()
    baseline = _open_fds()
    done = 0

    async def one() -> None:
        nonlocal done
        await fdatasync(log_fd)
        done += 1

    for rounds in (1, 2, 3):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
        assert done == 40 * rounds
        # Forty eventfds were open at once; a few are kept, none leak.
        assert len(durable._idle_eventfds) == durable.MAX_IDLE_EVENTFDS
        assert await _settled_fd_count(baseline + durable.MAX_IDLE_EVENTFDS) == (
            baseline + durable.MAX_IDLE_EVENTFDS
        )


async def test_flushes_one_after_another_reuse_one_eventfd(log_fd: int) -> None:
    durable._forget_idle_eventfds()
    await fdatasync(log_fd)
    (kept,) = durable._idle_eventfds
    for _ in range(5):
        os.write(log_fd, b"x")
        await fdatasync(log_fd)
        # Read back to zero before it was kept: the next report starts afresh.
        assert durable._idle_eventfds == [kept]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(kept)


async def test_a_failed_flush_reports_through_a_reused_eventfd_too(a_pipe: int, log_fd: int) -> None:
    durable._forget_idle_eventfds()
    await fdatasync(log_fd)
    with pytest.raises(OSError) as info:
        await fdatasync(a_pipe)
    assert info.value.errno == errno.EINVAL
    await fdatasync(log_fd)  # the eventfd that carried the failure is clean again
    assert len(durable._idle_eventfds) == 1


async def test_the_thread_reports_to_its_own_duplicate_of_the_eventfd(tmp_path: Path, log_fd: int) -> None:
    # The caller may close its eventfd while the flush runs; if the number
    # is reused at once, the report must not land in the new file.
    for _ in range(20):
        notify = os.eventfd(0, os.EFD_CLOEXEC)
        assert lib.kb_fdatasync_start(log_fd, notify) == 0
        os.close(notify)
        reused = os.open(tmp_path / "reused", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await trio.sleep(0.01)
            assert os.fstat(reused).st_size == 0
        finally:
            os.close(reused)


async def test_a_started_flush_is_waited_for_despite_cancellation(log_fd: int) -> None:
    finished = False
    with trio.CancelScope() as scope:
        scope.cancel()
        await fdatasync(log_fd)
        finished = True
        await trio.lowlevel.checkpoint()  # where the cancellation arrives
    assert finished and scope.cancelled_caught


async def test_a_cancellation_during_the_flush_waits_for_its_report(a_pipe: int, log_fd: int) -> None:
    durable._forget_idle_eventfds()
    outcomes: list[str] = []

    async def flush_then_checkpoint(target: int) -> None:
        try:
            await fdatasync(target)
            outcomes.append("flushed")
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno])
        await trio.lowlevel.checkpoint()
        outcomes.append("not cancelled")  # pragma: no cover - must not be reached

    for target, expected in ((log_fd, "flushed"), (a_pipe, "EINVAL")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush_then_checkpoint, target)
            await trio.sleep(0)  # the flush has started and is being waited for
            nursery.cancel_scope.cancel()
        assert outcomes.pop() == expected
        # Kept only once its report was read: the next flush starts clean.
        (kept,) = durable._idle_eventfds
        with pytest.raises(BlockingIOError):
            os.eventfd_read(kept)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_flushes_share_a_few_threads_kept_for_the_process(log_fd: int) -> None:
    before = _threads()
    for _ in range(3):
        notifies = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(40)]
        try:
            for notify in notifies:
                os.write(log_fd, b"x")
                assert lib.kb_fdatasync_start(log_fd, notify) == 0
            # Forty flushes in flight, at most eight threads for them.
            assert _threads() - before <= 8
            for notify in notifies:
                assert os.eventfd_read(notify) == 1
        finally:
            for notify in notifies:
                os.close(notify)


def test_a_forked_child_flushes_with_threads_of_its_own(log_fd: int) -> None:
    # The parent's flushers do not exist in a child: it must start its own
    # rather than queue for them forever.
    durable._forget_idle_eventfds()
    trio.run(fdatasync, log_fd)  # the parent has flushers now, and keeps an eventfd
    (inherited,) = durable._idle_eventfds
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by exit status
        code = 1
        try:
            signal.alarm(5)  # a child stuck in the queue dies instead
            # The parent's kept eventfd is closed in the child, not shared.
            if durable._idle_eventfds or str(inherited) in os.listdir("/proc/self/fd"):
                os._exit(3)
            os.write(log_fd, b"child\n")
            trio.run(fdatasync, log_fd)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_sync_directory_flushes_directories_only(tmp_path: Path) -> None:
    sync_directory(tmp_path)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        sync_directory(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        sync_directory(tmp_path / "absent")
