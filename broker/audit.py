"""Tamper-evident audit log: hash-chained records, group commit, sink fan-out.

Every decision the broker makes (allowed, denied, failed) becomes one
:class:`AuditRecord`. Records form a hash chain: each carries the SHA-256 of
the previous record (``prev``) and its own hash over every other field
(``hash``), so altering, deleting, inserting or reordering a record breaks the
chain at that point, and :func:`verify_chain` names the first bad line.

Two halves, one public module:

- pure chain logic (:class:`AuditRecord`, :func:`chain_hash`,
  :func:`verify_chain`) that does no I/O and is tested with hypothesis; it
  lives in the private ``broker._audit_chain`` and is re-exported here;
- the trio side (:func:`open_audit_log`, :class:`AuditLog`) that chains
  records in call order and commits them to the *primary* sink in batches
  (group commit: one durable write for everything queued since the last
  one), then fans them out to any other sinks in the background.

Sinks are provided by plugins through the ``kb_audit_sinks`` hook; the
built-in ``keybroker_auditlog`` plugin is the primary JSON-lines file sink
whose directory :func:`verify_audit_dir` reads.

No plaintext, key material or ciphertext is ever logged: ``details`` values
are restricted to ``str``/``int``/``bool``/``None`` and ``bytes`` are refused.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, final, runtime_checkable

import trio

# The pure chain logic lives in a private module; this is its public face.
from ._audit_chain import (
    GENESIS,
    MAX_LINE_BYTES,
    RECOVER_OP,
    AuditRecord,
    ChainHead,
    DetailValue,
    VerifyResult,
    _chain_entries,
    _Chained,
    _check_int,
    _check_str,
    _checked_details,
    _Entry,
    _rfc3339,
    chain_hash,
    joined_lines,
    parse_valid_line,
    verify_chain,
)
from .errors import Unavailable
from .logs import failure

__all__ = [
    "AUDIT_FILE_NAME",
    "CLOSE_TIMEOUT_S",
    "GENESIS",
    "MAX_LINE_BYTES",
    "TORN_FILE_PREFIX",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "ChainHead",
    "DetailValue",
    "StagedAuditSink",
    "VerifyResult",
    "audit_verify_main",
    "chain_hash",
    "joined_lines",
    "open_audit_log",
    "parse_valid_line",
    "verify_audit_dir",
    "verify_chain",
]

logger = logging.getLogger(__name__)

#: The primary file sink's log, inside ``<data_dir>/audit/``.
AUDIT_FILE_NAME: Final = "audit.jsonl"
#: Torn tails set aside at start-up are kept as ``torn-<unix time>.bin``.
TORN_FILE_PREFIX: Final = "torn-"

# How many records a non-primary sink may fall behind before new ones are
# dropped for it (and counted as gaps). Bounds the memory a hanging sink can
# pin to roughly this many records (~300 bytes each).
FANOUT_QUEUE_LIMIT: Final = 100_000

# On shutdown, how long non-primary sinks get to write what is queued before
# they are cancelled; the primary is always drained fully first.
FANOUT_CLOSE_GRACE_S: Final = 2.0

# How long shutdown waits for the primary's last batch and for sinks to
# close, even when the surrounding scope is already cancelled.
CLOSE_TIMEOUT_S: Final = 10.0
# At most this many scheduling rounds are spent gathering a commit: enough
# for a burst of pipelined requests to reach the log, never an unbounded wait.
LINGER_ROUNDS: Final = 8


# --- reading the file sink's log (keybroker audit verify) ------------------


def verify_audit_dir(path: Path, *, keep_hashes: bool = False) -> VerifyResult:
    """Verify the primary file sink's log in an audit directory.

    Args:
        path: the audit directory (``<data_dir>/audit``).
        keep_hashes: as for :func:`verify_chain`.

    Returns:
        The :class:`VerifyResult` over ``audit.jsonl``. Torn tails set aside
        at start-up (``torn-*.bin``) are not part of the chain.

    Raises:
        FileNotFoundError: no directory or no log in it.
        OSError: the log cannot be read.

    Note:
        Run it on a stopped broker, or accept that the last line may be a
        write still in flight.
    """
    with (path / AUDIT_FILE_NAME).open("rb") as fh:
        return verify_chain(fh, keep_hashes=keep_hashes)


def audit_verify_main(data_dir: Path, out: TextIO, expect_hash: str | None = None) -> int:
    """``keybroker audit verify``: check the chain under ``data_dir`` and report.

    Args:
        data_dir: the broker's data directory (the log is in ``audit/``).
        out: where the human-readable report goes.
        expect_hash: a record hash seen earlier (a ``last hash`` this
            command printed, kept elsewhere): the chain must still hold it,
            which a log cut short before it, or rewritten, does not.

    Returns:
        0 when the chain is intact, 1 when it is broken (including complete
        records set aside at a start-up, and ``expect_hash`` missing), 2 when
        there is no log to check or it cannot be read.
    """
    audit_dir = data_dir / "audit"
    if not (audit_dir / AUDIT_FILE_NAME).is_file():
        print(f"no audit log at {audit_dir / AUDIT_FILE_NAME}", file=out)
        return 2
    try:
        result = verify_audit_dir(audit_dir, keep_hashes=expect_hash is not None)
    except OSError as exc:
        print(f"cannot read the audit log: {exc}", file=out)
        return 2
    intact = result.ok
    if result.ok:
        print(f"audit chain intact: {result.records} records", file=out)
        print(f"last hash: {result.last_hash}", file=out)
    else:
        print(f"audit chain broken at record/line {result.first_bad}: {result.reason}", file=out)
    torn = sorted(p.name for p in audit_dir.glob(f"{TORN_FILE_PREFIX}*.bin"))
    if torn:
        print(f"note: {len(torn)} torn tail(s) set aside, not part of the chain: {', '.join(torn)}", file=out)
    if result.set_aside_lines:
        # A crash leaves at most a partial last line; whole records gone from
        # the end mean the log was altered there.
        print(
            f"ALTERED: {result.set_aside_lines} complete record(s) were set aside at a start-up "
            f"(see the audit.recover records and the torn files)",
            file=out,
        )
        intact = False
    if expect_hash is not None and expect_hash not in result.hashes:
        print(f"ALTERED: no record has the expected hash {expect_hash} (cut short or rewritten)", file=out)
        intact = False
    return 0 if intact else 1


# --- sinks -----------------------------------------------------------------


class AuditSink(Protocol):
    """Where audit records go; provided by ``kb_audit_sinks`` implementations.

    Exactly one sink is ``primary``: it holds the chain that ``keybroker
    audit verify`` checks, and a request is answered only once its record is
    durable there. Other sinks (a SIEM forwarder, say) receive the same
    records in the background and can never block or fail a request.

    The log calls ``open`` once, then ``write`` one call at a time (never
    concurrently), then ``aclose``.
    """

    #: Short name used in log messages and gap counters.
    name: str
    #: True for the one sink that holds the chain.
    primary: bool

    async def open(self) -> ChainHead | None:
        """Prepare the sink.

        Returns:
            Primary: the chain head it recovered — the last good record's seq
            and hash, and whether a torn tail was set aside. Non-primary: None.

        Raises:
            OSError: the primary cannot be opened (the broker does not start).
        """
        ...

    async def write(self, records: Sequence[AuditRecord]) -> None:
        """Persist ``records`` (consecutive, in chain order).

        Returns only once they are durable (flushed and fsynced). On failure
        the primary raises an ``OSError`` and must leave its storage as it
        was before the call (roll back a partial append), so that the next
        write continues the chain from the last durable record.
        """
        ...

    async def aclose(self) -> None:
        """Release the sink's resources.

        Idempotent, and called even when ``open`` failed, was cancelled or
        (for a non-primary sink) never ran.
        """
        ...


@runtime_checkable
class StagedAuditSink(AuditSink, Protocol):
    """A primary sink that can hand records to the OS now and make them durable later.

    With ``[audit] sync = "changes"`` (the default) the log appends every
    record as it is made — before the request it belongs to is answered, so
    it survives a crash of the broker process — and fsyncs in the
    background; only records of key changes and alarms wait for the fsync
    before their reply. A primary sink without these two methods gets every
    record through :meth:`AuditSink.write`, durable before its reply.
    """

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Hand ``records`` to the OS (consecutive, in chain order) without waiting for the disk.

        Runs on the event loop, so it must be quick: a ``write(2)`` into the
        page cache, not an fsync.

        Raises:
            OSError: the write failed; storage is rolled back to what it was
                before the call, as for :meth:`AuditSink.write`.
        """
        ...

    async def sync(self) -> None:
        """Make everything appended so far durable (fsync).

        Raises:
            OSError: the sync failed; what was appended may not be durable.
        """
        ...


# --- the trio side ---------------------------------------------------------


class _Batch:
    """Entries queued since the last commit, and their shared result."""

    __slots__ = ("done", "entries", "records")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.records: Sequence[AuditRecord] | None = None  # set once durable
        self.done = trio.Event()


class _SyncRound:
    """One background fsync of a staged primary and whether it succeeded."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.ok = False
        self.done = trio.Event()


class _Fanout:
    """Background delivery to one non-primary sink, with a bounded backlog."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.queue: collections.deque[AuditRecord] = collections.deque()
        self.gaps = 0
        self.closing = False
        self.finished = trio.Event()
        # Shielded like the writer, so the close grace applies even when the
        # surrounding scope is cancelled; open_audit_log cancels it after that.
        self.scope = trio.CancelScope(shield=True)
        self._wakeup = trio.Event()
        self._overflowing = False

    def push(self, records: Sequence[AuditRecord]) -> None:
        room = FANOUT_QUEUE_LIMIT - len(self.queue)
        if len(records) > room:
            # Keep the oldest queued records and drop the newest: the sink
            # sees one gap instead of a hole punched in what it already has.
            if not self._overflowing:
                logger.warning("audit sink %s is %d records behind; dropping new records for it",
                               self.sink.name, len(self.queue))
                self._overflowing = True
            self.gaps += len(records) - max(room, 0)
            records = records[: max(room, 0)]
        else:
            self._overflowing = False
        self.queue.extend(records)
        self._wakeup.set()

    def close(self) -> None:
        self.closing = True
        self._wakeup.set()

    async def run(self) -> None:
        inflight: list[AuditRecord] = []
        try:
            with self.scope:
                try:
                    await self.sink.open()
                except Exception as exc:
                    logger.error("audit sink %s failed to open; writes will still be tried: %s",
                                 self.sink.name, failure(exc))
                while True:
                    if not self.queue:
                        if self.closing:
                            return
                        await self._wakeup.wait()
                        self._wakeup = trio.Event()
                        continue
                    inflight = list(self.queue)
                    self.queue.clear()
                    try:
                        await self.sink.write(inflight)
                    except Exception as exc:
                        self.gaps += len(inflight)
                        logger.warning("audit sink %s lost records %d-%d: %r",
                                       self.sink.name, inflight[0].seq, inflight[-1].seq, exc)
                    inflight = []
        finally:
            # Cancelled at shutdown: what was in the write or still queued is lost.
            undelivered = len(inflight) + len(self.queue)
            if undelivered:
                self.gaps += undelivered
                logger.warning("audit sink %s closed with %d records undelivered",
                               self.sink.name, undelivered)
                self.queue.clear()
            self.finished.set()


@final
class AuditLog:
    """The broker's audit log; obtain one from :func:`open_audit_log`.

    Records are chained in the order :meth:`record` is called. With a
    staged primary (:class:`StagedAuditSink`, ``sync_interval`` set) each
    record is appended as it is made and a syncer task fsyncs in the
    background: at once when a caller waits for durability, otherwise within
    ``sync_interval`` seconds. Otherwise records are committed by one writer
    task: everything queued while the previous write was in progress goes
    out in the next single ``write()`` (one fsync), then all those callers
    are released together.
    """

    def __init__(
        self,
        primary: AuditSink,
        fanouts: Sequence[_Fanout],
        head: ChainHead,
        *,
        node: str,
        clock: Callable[[], float],
        sync_interval: float | None = None,
    ) -> None:
        self._primary = primary
        # Set when records are appended now and fsynced in the background.
        self._staged = primary if sync_interval is not None and isinstance(primary, StagedAuditSink) else None
        self._sync_interval = sync_interval or 0.0
        self._appended = head.seq  # last record handed to the staged primary
        self._synced = head.seq  # last record the staged primary made durable
        self._round = _SyncRound()  # the next background fsync; waiters hold it
        self._urgent = trio.Event()  # a caller waits for the next fsync
        self._fanouts = list(fanouts)
        self._node = node
        self._clock = clock
        self._seq = head.seq
        self._hash = head.hash
        self._batch = _Batch()
        # Written ahead of the next batch until they are durable (recovery notes).
        self._notes: list[_Entry] = []
        self._wakeup = trio.Event()
        self._healthy = True
        self._closing = False
        self._writes = 0
        self._writer_scope = trio.CancelScope(shield=True)
        self._writer_finished = trio.Event()

    @property
    def healthy(self) -> bool:
        """False after the primary's last write failed; True again once one succeeds."""
        return self._healthy

    @property
    def head(self) -> tuple[int, str]:
        """The last chained record's (seq, hash): durable, or with a staged primary appended."""
        return self._seq, self._hash

    @property
    def writes(self) -> int:
        """How many ``write()`` calls the primary has completed (group-commit metric)."""
        return self._writes

    @property
    def sink_gaps(self) -> Mapping[str, int]:
        """Records each non-primary sink has missed so far, by sink name."""
        return {f.sink.name: f.gaps for f in self._fanouts}

    @staticmethod
    def _entry(
        ts: str,
        *,
        principal: str,
        op: str,
        outcome: str,
        key: str | None,
        version: int | None,
        code: str | None,
        alarm: bool,
        details: Mapping[str, DetailValue] | None,
    ) -> _Entry:
        # The usual record (ASCII strings, no code) passes one test; anything
        # else gets each field's own check and error message.
        if not (
            type(principal) is str and type(op) is str and type(outcome) is str and type(key) is str
            and code is None and type(version) is int and type(alarm) is bool
            and principal.isascii() and op.isascii() and outcome.isascii() and key.isascii()
        ):
            for name, value in (("principal", principal), ("op", op), ("outcome", outcome)):
                _check_str(name, value)
            _check_str("key", key, optional=True)
            _check_str("code", code, optional=True)
            _check_int("version", version, optional=True)
            if not isinstance(alarm, bool):
                raise TypeError("audit alarm must be a bool")
        return _Entry(ts, principal, op, outcome, key, version, code, alarm, _checked_details(details))

    async def record(
        self,
        *,
        principal: str,
        op: str,
        outcome: str,
        key: str | None = None,
        version: int | None = None,
        code: str | None = None,
        alarm: bool = False,
        details: Mapping[str, DetailValue] | None = None,
        durable: bool = True,
    ) -> AuditRecord:
        """Append one record and wait until it is durable in the primary sink.

        Args:
            principal: who asked.
            op: the operation (an RPC method name, or an internal one like
                ``audit.recover``).
            outcome: "allowed", "denied", "error", "recovered", ...
            key: the key *name*, when the operation concerns one.
            version: the key version, when one is involved.
            code: the protocol error code on failure.
            alarm: mark records an operator must look at (compromised keys).
            details: a few non-secret facts; values str/int/bool/None only.
            durable: wait for the fsync. With a staged primary, False returns
                as soon as the record is written to the OS (it survives a
                crash of the broker, and is fsynced within the sync
                interval); ignored otherwise.

        Returns:
            The record as written, with its seq and hash.

        Raises:
            TypeError: a field has the wrong type; ``details`` holds bytes or
                another non-scalar value.
            ValueError: ``details`` too large, or a lone surrogate in a string.
            Unavailable: the primary sink failed to write this batch, or the
                log is closed. The record was not acknowledged and the chain
                was not advanced past it; later calls try again.

        Cancellation:
            Safe at any point. The record is queued before the first
            checkpoint, and commits are shielded from callers'
            cancellation: a caller cancelled while waiting does not learn
            the outcome, but its record is still written in its place in
            the chain (unless the log is forced shut first; see
            :func:`open_audit_log`). The chain stays consistent either way.
        """
        if self._closing:
            raise Unavailable("audit log unavailable (closed)")
        entry = self._entry(
            _rfc3339(self._clock()),
            principal=principal, op=op, outcome=outcome, key=key, version=version, code=code, alarm=alarm,
            details=details,
        )
        return (await self._submit([entry], durable or alarm))[0]

    async def record_many(
        self, records: Sequence[Mapping[str, Any]], *, durable: bool = True
    ) -> Sequence[AuditRecord]:
        """Append several records at once, in order: what :meth:`record` does for each, in one write.

        Args:
            records: one mapping per record, holding :meth:`record`'s keyword
                arguments (``durable`` aside).
            durable: as for :meth:`record`; a record with ``alarm`` set makes
                the whole call wait for the fsync.

        Returns:
            The records as written (each built when read).

        Raises:
            TypeError, ValueError, Unavailable: as :meth:`record`; on any of
                them none of the records is written.

        Cancellation: as :meth:`record`.
        """
        if self._closing:
            raise Unavailable("audit log unavailable (closed)")
        # One time for the call: its records are accepted at the same moment.
        ts = _rfc3339(self._clock())
        entries = [self._entry(ts, **fields) for fields in records]
        if not entries:
            return []
        return await self._submit(entries, durable or any(e.alarm for e in entries))

    async def _submit(self, entries: list[_Entry], durable: bool) -> Sequence[AuditRecord]:
        if self._staged is not None:
            return await self._record_staged(self._staged, entries, durable)
        batch = self._batch
        index = len(batch.entries)
        batch.entries.extend(entries)
        self._wakeup.set()
        await batch.done.wait()
        if batch.records is None:
            raise Unavailable("audit log unavailable")
        return batch.records[index : index + len(entries)]

    def _chain(self, entries: Sequence[_Entry]) -> _Chained:
        """``entries`` as records chained on the current head (the head does not move)."""
        return _chain_entries(entries, self._node, self._seq, self._hash)

    def _failed(self, exc: BaseException) -> None:
        # Anything but OSError is a sink bug, hence the traceback.
        if self._healthy:
            logger.error("audit log unavailable: primary sink %s failed: %r", self._primary.name, exc,
                         exc_info=not isinstance(exc, OSError))
        self._healthy = False

    def _succeeded(self) -> None:
        if not self._healthy:
            logger.warning("audit log available again (primary sink %s)", self._primary.name)
        self._healthy = True

    async def _record_staged(
        self, sink: StagedAuditSink, entries: list[_Entry], durable: bool
    ) -> Sequence[AuditRecord]:
        """Chain and append ``notes + entries`` now; wait for the fsync only if ``durable``."""
        records = self._chain([*self._notes, *entries] if self._notes else entries)
        try:
            sink.append(records)
        except Exception as exc:
            # Fail closed as in _commit: the head stays on the last appended record.
            self._failed(exc)
            raise Unavailable("audit log unavailable") from None
        self._seq, self._hash = records.end
        self._appended = self._seq
        del self._notes[:]
        for fanout in self._fanouts:
            fanout.push(records)
        mine = records if len(records) == len(entries) else records[len(records) - len(entries) :]
        if not durable:
            self._wakeup.set()
            return mine
        sync_round = self._round
        self._urgent.set()
        self._wakeup.set()
        await sync_round.done.wait()
        if not sync_round.ok:
            raise Unavailable("audit log unavailable")
        return mine

    async def _run_syncer(self, sink: StagedAuditSink) -> None:
        """Fsync what was appended: at once for a waiting caller, else within the interval."""
        try:
            with self._writer_scope:
                while True:
                    if self._synced == self._appended:
                        if self._closing:
                            return
                        await self._wakeup.wait()
                        self._wakeup = trio.Event()
                        continue
                    if not self._closing:
                        if self._urgent.is_set():
                            # What the wait would do, without its deadline
                            # scope (a few µs of the event loop per round): a
                            # scheduling point, so that the records of tasks
                            # already runnable join this round.
                            await trio.lowlevel.checkpoint()
                        else:
                            with trio.move_on_after(self._sync_interval):
                                await self._urgent.wait()
                    self._urgent = trio.Event()
                    sync_round, self._round = self._round, _SyncRound()
                    target = self._appended
                    try:
                        await sink.sync()
                    except Exception as exc:
                        self._failed(exc)
                        if self._closing:
                            return  # the waiters are released below
                    else:
                        self._succeeded()
                        self._writes += 1
                        self._synced = target
                        sync_round.ok = True
                    sync_round.done.set()
        finally:
            self._closing = True
            self._round.done.set()
            self._writer_finished.set()

    async def _commit(self, batch: _Batch) -> None:
        """Chain ``notes + batch`` on the durable head and write it; always releases the waiters."""
        try:
            records = self._chain(self._notes + batch.entries)
            try:
                await self._primary.write(records)
            except Exception as exc:
                # Fail closed: nobody is acknowledged and the head stays on the
                # last durable record, so the next batch re-chains from there.
                self._failed(exc)
                return
            self._succeeded()
            self._writes += 1
            self._seq, self._hash = records.end
            self._appended = self._synced = self._seq
            del self._notes[:]
            batch.records = records[len(records) - len(batch.entries):]
            for fanout in self._fanouts:
                fanout.push(records)
        finally:
            batch.done.set()

    async def _run_writer(self) -> None:
        try:
            # Shielded: cancelling the surrounding scope (server shutdown)
            # must neither interrupt a commit half-way nor abandon what is
            # queued. open_audit_log stops the writer itself, once it has
            # drained or the close timeout has passed.
            with self._writer_scope:
                while True:
                    if not self._batch.entries:
                        if self._closing:
                            return
                        await self._wakeup.wait()
                        self._wakeup = trio.Event()
                        continue
                    # Let every task that is ready to run add its record
                    # first: while a scheduling round still adds records,
                    # give it another, so pipelined requests share one write
                    # and one fsync instead of trickling in a few per commit.
                    for _ in range(LINGER_ROUNDS):
                        queued = len(self._batch.entries)
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        if len(self._batch.entries) == queued:
                            break
                    batch, self._batch = self._batch, _Batch()
                    await self._commit(batch)
        finally:
            # Cancelled with records queued (shutdown timed out): release
            # their callers with an error rather than leave them waiting.
            self._closing = True
            self._batch.done.set()
            self._writer_finished.set()


def _split_sinks(sinks: Sequence[AuditSink]) -> tuple[AuditSink, list[AuditSink]]:
    primaries = [s for s in sinks if s.primary]
    if len(primaries) != 1:
        names = ", ".join(s.name for s in primaries) or "none"
        raise ValueError(f"exactly one audit sink must be primary (found: {names})")
    return primaries[0], [s for s in sinks if not s.primary]


async def _close_sink(sink: AuditSink) -> None:
    """Close one sink within its own CLOSE_TIMEOUT_S: a sink that hangs costs no other its close."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
        try:
            await sink.aclose()
        except Exception as exc:
            logger.error("audit sink %s failed to close: %s", sink.name, failure(exc))
    if scope.cancelled_caught:
        logger.warning("audit sink %s did not close within %s s", sink.name, CLOSE_TIMEOUT_S)


@asynccontextmanager
async def open_audit_log(
    sinks: Sequence[AuditSink],
    *,
    node: str,
    clock: Callable[[], float] = time.time,
    sync_interval: float | None = None,
) -> AsyncIterator[AuditLog]:
    """Open the sinks, recover the chain head and run the writer task.

    If the primary set aside a torn tail, the first record written is
    ``op="audit.recover", outcome="recovered"`` by principal ``keybroker``,
    saying how many bytes went where (an alarm when more than a torn last
    line was set aside). Should that first write fail, the note is retried
    ahead of the next batch.

    Args:
        sinks: every sink the plugins provided; exactly one is primary.
        node: this broker's node name, stored in each record.
        clock: Unix time source for ``ts``.
        sync_interval: with a :class:`StagedAuditSink` primary, append records
            as they are made and fsync them within this many seconds (at once
            for ``record(durable=True)``). None: every record is durable
            before ``record`` returns.

    Yields:
        The :class:`AuditLog`.

    Raises:
        ValueError: not exactly one primary sink, or it returned no ChainHead.
        OSError: the primary sink could not be opened.

    Resource handling:
        On exit, even when the surrounding scope is cancelled, everything
        already queued is written to the primary (for up to
        ``CLOSE_TIMEOUT_S``; past that the writer is cancelled, and callers
        still waiting get ``Unavailable`` although their batch may have
        reached the disk), other sinks get ``FANOUT_CLOSE_GRACE_S`` to catch
        up, and every sink is closed.
    """
    primary, others = _split_sinks(sinks)
    _check_str("node", node)
    try:
        head = await primary.open()
        if not isinstance(head, ChainHead):
            raise ValueError(f"primary audit sink {primary.name} returned no ChainHead from open()")
    except BaseException:
        # Also on cancellation: open() may have finished its blocking half
        # (file open, lock taken) before the cancel was delivered.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await _close_sink(primary)
        raise
    fanouts = [_Fanout(s) for s in others]
    log = AuditLog(primary, fanouts, head, node=node, clock=clock, sync_interval=sync_interval)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            for fanout in fanouts:
                nursery.start_soon(fanout.run)
            if head.set_aside_bytes:
                log._notes.append(log._entry(
                    _rfc3339(clock()), principal="keybroker", op=RECOVER_OP, outcome="recovered",
                    key=None, version=None, code=None, alarm=head.set_aside_lines > 0,
                    details={"set_aside_bytes": head.set_aside_bytes, "set_aside_to": head.set_aside_path,
                             "set_aside_lines": head.set_aside_lines, "after_seq": head.seq},
                ))
                # Bounded but not cancellable by the caller, like any commit;
                # if it fails or times out the note is retried with the next batch.
                with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                    await log._commit(_Batch())
            if log._staged is not None:
                nursery.start_soon(log._run_syncer, log._staged)
            else:
                nursery.start_soon(log._run_writer)
            try:
                yield log
            except BaseException as exc:
                # Re-raised below, outside the nursery, so callers see their
                # own exception rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                log._closing = True
                log._wakeup.set()
                with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                    await log._writer_finished.wait()
                log._writer_scope.cancel()
                for fanout in fanouts:
                    fanout.close()
                with trio.move_on_after(FANOUT_CLOSE_GRACE_S, shield=True):
                    for fanout in fanouts:
                        await fanout.finished.wait()
                for fanout in fanouts:
                    fanout.scope.cancel()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _close_sink(primary)
            # The others at once, each within its own timeout.
            async with trio.open_nursery() as closing:
                for sink in others:
                    closing.start_soon(_close_sink, sink)
    if body_error is not None:
        raise body_error

