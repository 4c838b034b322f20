"""The syslog audit sink against a real rsyslog on loopback, and against a
receiver that hangs: records arrive as RFC 5424 with their structured data
intact, a stopped or stuck receiver never costs a local record, and the gap
is reported to the receiver once it is back.

rsyslog runs from its own config file in a temporary directory (imtcp and
imudp on a free loopback port, a template writing the message id, the
structured data as rsyslog parsed it, and the raw message), with its own
work directory and pid file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from broker import audit as audit_module
from broker.app import Broker, open_broker
from broker.audit import verify_audit_dir
from broker.config import parse_config
from broker.errors import BrokerError
from tests._rfc5424 import MESSAGE, parse_sd, split_sd
from tests.conftest import Caller, require

RSYSLOGD = shutil.which("rsyslogd") or next(
    (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None
)
HOSTILE = 'cn=Eve "the] \\admin"'
SD_ID = "keybroker@32473"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Rsyslog:
    """One rsyslogd of the test's own, writing what it receives to ``out``."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.out = directory / "received.log"
        self.conf = directory / "rsyslog.conf"
        self.pidfile = directory / "rsyslogd.pid"
        (directory / "work").mkdir(exist_ok=True)
        self.conf.write_text(
            f'global(workDirectory="{directory / "work"}")\n'
            'module(load="imtcp")\nmodule(load="imudp")\n'
            'template(name="fields" type="string" string="%msgid%\\t%structured-data%\\t%rawmsg%\\n")\n'
            'ruleset(name="kb") {\n'
            f'  action(type="omfile" file="{self.out}" template="fields")\n'
            "}\n"
            f'input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="kb")\n'
            f'input(type="imudp" address="127.0.0.1" port="{port}" ruleset="kb")\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert RSYSLOGD is not None
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=subprocess.DEVNULL, stderr=(self.directory / "rsyslogd.err").open("ab"),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.directory / "rsyslogd.err").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("rsyslogd did not start listening")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def received(self) -> list[dict[str, Any]]:
        """What rsyslog wrote: msgid, its parsed structured data, our SD params, the raw message."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8").splitlines():
            msgid, rsyslog_sd, raw = line.split("\t", 2)
            match = MESSAGE.fullmatch(raw.encode())
            assert match, raw
            rest = match["rest"].decode()
            sd, msg = split_sd(rest)
            our_sd = rest if msg is None else rest[: -(len(msg) + 1)]
            found.append({"msgid": msgid, "rsyslog_sd": rsyslog_sd, "sd": sd, "msg": msg, "raw": raw,
                          "our_sd": our_sd})
        return found

    def seqs(self) -> set[int]:
        return {int(m["sd"][SD_ID]["seq"]) for m in self.received() if SD_ID in m["sd"]}


@pytest.fixture
def rsyslog(short_tmp: Path) -> Iterator[Rsyslog]:
    require(RSYSLOGD is not None, "rsyslogd")
    (short_tmp / "rsyslog").mkdir()
    server = Rsyslog(short_tmp / "rsyslog", _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _local_records(broker: Broker) -> list[dict[str, Any]]:
    lines = (broker.config.audit_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def _until(condition: Any, what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def _broker(short_tmp: Path, syslog: dict[str, Any]) -> AsyncIterator[Broker]:
    config = parse_config(
        {"plugins": {"syslog": {"hostname": "kb-test", "send_timeout_s": 1.0, "reconnect_max_s": 0.2,
                                **syslog}},
         "scheduler": {"enabled": False}},
        data_dir=short_tmp / "data",
    )
    async with open_broker(config, run_scheduler=False) as broker:
        yield broker


async def _traffic(broker: Broker, owner: str, name: str) -> None:
    admin = Caller(broker, owner)
    await admin("key.create", name=name, type="aes256-gcm")
    await admin("encrypt", key=name, plaintext=b"secret")
    with pytest.raises(BrokerError):
        await Caller(broker, HOSTILE)("key.get", name=name)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_records_reach_rsyslog_with_structured_data_intact(
    rsyslog: Rsyslog, short_tmp: Path, owner: str, transport: str
) -> None:
    async with _broker(short_tmp, {"transport": transport, "address": f"127.0.0.1:{rsyslog.port}"}) as broker:
        await _traffic(broker, owner, "app.k-1/x")
        local = _local_records(broker)
        await _until(lambda: rsyslog.seqs() >= {r["seq"] for r in local}, "every record in rsyslog")
    by_seq = {int(m["sd"][SD_ID]["seq"]): m for m in rsyslog.received()}
    assert [r["op"] for r in local] == ["key.create", "key.create", "encrypt", "key.get"]
    for r in local:
        message = by_seq[r["seq"]]
        # rsyslog parsed our structured data as structured data, byte for byte.
        assert message["rsyslog_sd"] == message["our_sd"]
        assert message["msgid"] == r["op"]
        params = parse_sd(message["rsyslog_sd"])[SD_ID]
        expected = {"seq": str(r["seq"]), "op": r["op"], "principal": r["principal"], "outcome": r["outcome"],
                    "alarm": "false", "hash": r["hash"]}
        for field in ("key", "version", "code"):
            if r[field] is not None:
                expected[field] = str(r[field])
        assert params == expected
        assert MESSAGE.fullmatch(message["raw"].encode())["host"] == b"kb-test"  # type: ignore[index]
    denied = next(m for m in by_seq.values() if m["msgid"] == "key.get")
    assert parse_sd(denied["rsyslog_sd"])[SD_ID]["principal"] == HOSTILE
    assert '\\"the\\] \\\\admin\\"' in denied["raw"]  # escaped per RFC 5424 §6.3.3
    assert not any(m["msgid"] == "audit.gap" for m in by_seq.values())


async def test_stopping_rsyslog_loses_no_local_record_and_the_gap_is_reported(
    rsyslog: Rsyslog, short_tmp: Path, owner: str
) -> None:
    async with _broker(short_tmp, {"transport": "tcp", "address": f"127.0.0.1:{rsyslog.port}"}) as broker:
        await _traffic(broker, owner, "before")
        before = {r["seq"] for r in _local_records(broker)}
        await _until(lambda: rsyslog.seqs() >= before, "the first records in rsyslog")

        rsyslog.stop()
        admin = Caller(broker, owner)
        for i in range(20):
            await admin("encrypt", key="before", plaintext=b"%d" % i)
        await _until(lambda: broker.audit.sink_gaps.get("syslog", 0) > 0, "a counted gap")
        # Every record is in the local chain, which still verifies.
        result = verify_audit_dir(broker.config.audit_dir)
        local = _local_records(broker)
        assert result.ok and result.records == len(local) == local[-1]["seq"]
        assert sum(r["op"] == "encrypt" for r in local) == 21

        rsyslog.start()
        await _traffic(broker, owner, "after")
        everything = {r["seq"] for r in _local_records(broker)}
        await _until(
            lambda: any(m["msgid"] == "audit.gap" for m in rsyslog.received())
            and max(rsyslog.seqs()) == max(everything),
            "the gap notice and the newest record",
        )
        gaps = broker.audit.sink_gaps["syslog"]
    forwarded = rsyslog.seqs()
    (notice,) = [m for m in rsyslog.received() if m["msgid"] == "audit.gap"]
    params = parse_sd(notice["rsyslog_sd"])["keybroker-gap@32473"]
    missing = everything - forwarded
    ranges = [tuple(map(int, part.split("-"))) if "-" in part else (int(part),) * 2
              for part in params["ranges"].split(",")]
    # The notice names exactly the records rsyslog never got, and nothing was lost silently.
    assert missing == {seq for a, b in ranges for seq in range(a, b + 1)}
    # At least the batch that met the refused connection; records that
    # arrived while the sink was backing off waited in its queue instead.
    assert int(params["missed"]) == len(missing) == gaps >= 1
    assert (int(params["first_seq"]), int(params["last_seq"])) == (min(missing), max(missing))
    assert notice["msg"] and f"{len(missing)} audit records were not forwarded" in notice["msg"]


class _Receiver:
    """A TCP syslog receiver the test controls: it can stop reading (hang) at will."""

    def __init__(self) -> None:
        self.listener = trio.socket.socket()
        self.frames: list[bytes] = []

    async def serve(self, hang: trio.Event, task_status: trio.TaskStatus[int]) -> None:
        await self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        task_status.started(self.listener.getsockname()[1])
        buffer = b""
        while True:
            conn, _ = await self.listener.accept()
            with conn:
                while True:
                    if hang.is_set():
                        await trio.sleep_forever()
                    data = await conn.recv(65536)
                    if not data:
                        break
                    buffer += data
                    # RFC 6587 octet counting: LEN SP MSG, back to back.
                    while b" " in buffer:
                        length, rest = buffer.split(b" ", 1)
                        if len(rest) < int(length):
                            break
                        self.frames.append(rest[: int(length)])
                        buffer = rest[int(length):]


async def test_a_hanging_receiver_never_blocks_requests(
    short_tmp: Path, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small per-sink backlog, so the broker also drops (and counts) records
    # for the sink while it hangs, not only the batch that timed out.
    monkeypatch.setattr(audit_module, "FANOUT_QUEUE_LIMIT", 5)
    receiver, hang = _Receiver(), trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(receiver.serve, hang)
        async with _broker(short_tmp, {"transport": "tcp", "address": f"127.0.0.1:{port}",
                                       "send_timeout_s": 0.5}) as broker:
            admin = Caller(broker, owner)
            await admin("key.create", name="k", type="aes256-gcm")
            await _until(lambda: len(receiver.frames) == 2, "the first records")

            sink = next(f.sink for f in broker.audit._fanouts if f.sink.name == "syslog")
            real_send = sink._send

            entered = trio.Event()

            async def stuck(messages: Any) -> None:  # a receiver that stopped reading
                entered.set()
                await trio.sleep_forever()

            monkeypatch.setattr(sink, "_send", stuck)
            started = trio.current_time()
            for i in range(40):
                await admin("encrypt", key="k", plaintext=b"%d" % i)
                if i == 0:  # the sink is now stuck sending this record
                    await _until(entered.is_set, "the sink to start sending")
            # Had requests waited for the sink, each would have taken the
            # 0.5 s send timeout (20 s in all); they waited for the local file only.
            assert trio.current_time() - started < 4.0
            await _until(lambda: broker.audit.sink_gaps["syslog"] >= 35, "records dropped for syslog")
            monkeypatch.setattr(sink, "_send", real_send)
            await admin("key.get", name="k")
            local = _local_records(broker)
            await _until(lambda: any(b"audit.gap" in f for f in receiver.frames)
                         and f'seq="{local[-1]["seq"]}"'.encode() in receiver.frames[-1], "the gap notice")
            assert verify_audit_dir(broker.config.audit_dir).records == len(local) == 2 + 40 + 1
        nursery.cancel_scope.cancel()
    seqs: set[int] = set()
    noticed: set[int] = set()
    missed = 0
    for frame in receiver.frames:
        match = MESSAGE.fullmatch(frame)
        assert match, frame
        sd = parse_sd(match["rest"].decode())
        if SD_ID in sd:
            seqs.add(int(sd[SD_ID]["seq"]))
        else:
            # One notice per stretch of trouble: the batch that timed out is
            # known at once, records the broker dropped for the sink only
            # once a later record shows the jump in seq.
            params = sd["keybroker-gap@32473"]
            missed += int(params["missed"])
            for part in params["ranges"].split(","):
                first, _, last = part.partition("-")
                noticed.update(range(int(first), int(last or first) + 1))
    missing = {r["seq"] for r in local} - seqs
    assert missing == noticed and missed == len(missing) >= 35
