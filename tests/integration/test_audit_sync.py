"""``[audit] sync``: which replies wait for the audit fsync, through a real in-process broker."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio

from broker.app import open_broker
from broker.audit import verify_audit_dir
from broker.config import Config
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from tests.conftest import Caller, ConfigFactory
from tests.integration.test_auditlog_sink import GatedSink


class GatedSinkPlugin:
    """Provides the primary file sink with a gate on its fsyncs, in place of ``auditlog``."""

    def __init__(self) -> None:
        self.sink: GatedSink | None = None

    @hookimpl
    def kb_audit_sinks(self, config: Config) -> list[GatedSink]:
        self.sink = GatedSink(config.audit_dir)
        return [self.sink]


async def answered_before_fsync(call: Awaitable[object], sink: GatedSink) -> bool:
    """Whether ``call`` returns while the sink's fsyncs are held back (then lets them through)."""
    done = False

    async def run() -> None:
        nonlocal done
        await call
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0.1)
        answered = done
        sink.gate.set()
    sink.gate = trio.Event()
    return answered


@pytest.mark.parametrize(
    ("mode", "use_waits"), [("changes", False), ("always", True)], ids=["changes", "always"]
)
async def test_use_replies_wait_for_the_fsync_only_when_configured(
    make_config: ConfigFactory, owner: str, mode: str, use_waits: bool
) -> None:
    plugin = GatedSinkPlugin()
    config = make_config({"audit": {"sync": mode}, "disabled_plugins": ["auditlog"]})
    async with open_broker(config, extra_plugins=[plugin], run_scheduler=False) as broker:
        assert plugin.sink is not None
        admin = Caller(broker, owner)
        # A key change waits for its fsync in both modes.
        assert not await answered_before_fsync(admin("key.create", name="k", type="aes256-gcm"), plugin.sink)
        answered = await answered_before_fsync(admin("encrypt", key="k", plaintext=b"x"), plugin.sink)
        assert answered is not use_waits
        lines = (config.audit_dir / "audit.jsonl").read_bytes().splitlines()
        assert b'"op":"encrypt"' in lines[-1]  # in the file before (or with) the reply
    result = verify_audit_dir(config.audit_dir)
    assert result.ok and result.records == 3


@pytest.mark.parametrize(
    "audit", [{"sync": "sometimes"}, {"sync_interval_s": 0}, {"sync_interval_s": 60}, {"fsync": True}]
)
def test_bad_audit_options_are_refused(make_config: ConfigFactory, audit: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        make_config({"audit": audit})


def test_default_is_staged(make_config: ConfigFactory, tmp_path: Path) -> None:
    audit = make_config().audit
    assert (audit.sync, audit.staged_interval) == ("changes", 0.01)
    assert make_config({"audit": {"sync": "always"}}).audit.staged_interval is None
