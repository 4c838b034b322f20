"""The plugin manager: built-ins and a third-party backend load through the
``keybroker`` entry-point group, serve keys, and can be disabled; broken
plugins are refused at start-up."""

from __future__ import annotations

import pluggy
import pytest

from broker.app import open_broker
from broker.errors import BrokerError
from broker.hookspecs import hookimpl
from broker.plugins import Plugins, StartupError
from tests.conftest import Caller, ConfigFactory


def test_entry_points_load_builtins_and_the_demo_plugin(make_config: ConfigFactory) -> None:
    names = Plugins(make_config()).names
    for expected in ("sqlite", "software", "rbac", "governance", "auditlog", "demo-software"):
        assert expected in names


async def test_third_party_backend_serves_its_protection(make_config: ConfigFactory, owner: str) -> None:
    async with open_broker(make_config(), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        meta = await admin("key.create", name="demo/k", type="aes256-gcm", protection="demo-software")
        assert meta["protection"] == "demo-software"
        ct = (await admin("encrypt", key="demo/k", plaintext=b"hello"))["ciphertext"]
        assert (await admin("decrypt", ciphertext=ct))["plaintext"] == b"hello"
        assert type(broker.backends["demo-software"]).__module__ == "keybroker_demo_backend"


async def test_disabled_plugin_is_not_loaded(make_config: ConfigFactory, owner: str) -> None:
    config = make_config({"disabled_plugins": ["demo-software"]})
    assert "demo-software" not in Plugins(config).names
    async with open_broker(config, run_scheduler=False) as broker:
        with pytest.raises(BrokerError) as info:
            await Caller(broker, owner)("key.create", name="k", type="aes256-gcm", protection="demo-software")
        assert info.value.code == "invalid_argument"


class _UnknownHook:
    @hookimpl
    def kb_no_such_hook(self) -> None:
        """Implements a hook no spec declares."""


class _ClashingBackend:
    @hookimpl
    def kb_backends(self, config: object, root: object) -> list[object]:
        class Clash:
            protection = "software"

        return [Clash()]


def test_unknown_hooks_are_refused(make_config: ConfigFactory) -> None:
    with pytest.raises(pluggy.PluginValidationError):
        Plugins(make_config(), extra=[_UnknownHook()])


async def test_two_backends_for_one_protection_are_refused(make_config: ConfigFactory) -> None:
    with pytest.raises(StartupError, match="software"):
        async with open_broker(make_config(), extra_plugins=[_ClashingBackend()]):
            pass


def test_missing_store_is_a_startup_error(make_config: ConfigFactory) -> None:
    with pytest.raises(StartupError, match="store"):
        Plugins(make_config({"store": "cassandra"})).store()
