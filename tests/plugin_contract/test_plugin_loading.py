"""The plugin manager: built-ins and a third-party backend load through the
``keybroker`` entry-point group, serve keys, and can be disabled; broken
plugins are refused at start-up."""

from __future__ import annotations

import json
import os
from collections.abc import Generator

import pluggy
import pytest

from broker.app import open_broker
from broker.config import Config
from broker.errors import BrokerError
from broker.events import KeyEvent
from broker.hookspecs import hookimpl
from broker.plugins import Plugins, StartupError
from broker.policy import AuthzRequest, Decision, Policy
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


# --- misbehaving plugins: the broker fails closed and keeps going --------------------


class _FailingObserver:
    @hookimpl
    def kb_key_event(self, event: KeyEvent) -> None:
        raise RuntimeError("webhook down")


class _Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def kb_key_event(self, event: KeyEvent) -> None:
        self.seen.append((event.name, event.event.value))


async def test_a_failing_key_event_observer_changes_nothing(make_config: ConfigFactory, owner: str) -> None:
    observer = _Observer()
    config = make_config()
    plugins = [_FailingObserver(), observer]
    async with open_broker(config, run_scheduler=False, extra_plugins=plugins) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="k", type="aes256-gcm", rotation_period_s=60)
        await admin("key.rotate", name="k")
        assert ("k", "created") in observer.seen and ("k", "rotated") in observer.seen
        assert (await admin("key.get", name="k"))["primary_version"] == 2


class _AnswersWith(Policy):
    def __init__(self, answer: object) -> None:
        self.answer = answer

    def authorize(self, request: AuthzRequest) -> Decision | None:
        if request.principal == "app" and request.operation == "encrypt":
            return self.answer  # type: ignore[return-value]
        return None


class _PolicyPlugin:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @hookimpl
    def kb_policies(self, config: Config) -> list[Policy]:
        return [self.policy]


APP_GRANT = {"plugins": {"rbac": {"grants": [{"principals": ["app"], "roles": ["app"], "keys": ["*"]}]}}}


@pytest.mark.parametrize(
    ("answer", "allowed"),
    [("deny", False), (False, False), (0, False), ("maybe", False), ("allow", True), (None, True)],
)
async def test_a_policy_answer_that_is_no_decision_is_a_denial(
    make_config: ConfigFactory, owner: str, answer: object, allowed: bool
) -> None:
    async with open_broker(
        make_config(APP_GRANT), run_scheduler=False, extra_plugins=[_PolicyPlugin(_AnswersWith(answer))]
    ) as broker:
        await Caller(broker, owner)("key.create", name="k", type="aes256-gcm")
        call = Caller(broker, "app")("encrypt", key="k", plaintext=b"x")
        if allowed:
            assert (await call)["version"] == 1
        else:
            with pytest.raises(BrokerError) as info:
                await call
            assert info.value.code == "permission_denied"


class _Raising(Policy):
    def authorize(self, request: AuthzRequest) -> Decision | None:
        if request.principal == "app":
            raise RuntimeError("policy bug")
        return None


async def test_a_raising_policy_fails_closed_and_is_audited(make_config: ConfigFactory, owner: str) -> None:
    async with open_broker(
        make_config(APP_GRANT), run_scheduler=False, extra_plugins=[_PolicyPlugin(_Raising())]
    ) as broker:
        await Caller(broker, owner)("key.create", name="k", type="aes256-gcm")
        with pytest.raises(RuntimeError):
            await Caller(broker, "app")("encrypt", key="k", plaintext=b"x")
        lines = (broker.config.audit_dir / "audit.jsonl").read_bytes().splitlines()
        last = json.loads(lines[-1])
        assert (last["principal"], last["op"]) == ("app", "encrypt")
        assert (last["outcome"], last["code"]) == ("error", "internal")


def test_a_misspelled_disabled_plugin_stops_the_start(make_config: ConfigFactory) -> None:
    # Left alone, the plugin the name meant would stay enabled.
    with pytest.raises(StartupError, match="demo-sofware"):
        Plugins(make_config({"disabled_plugins": ["demo-sofware"]}))


class _OnePolicyNotAList:
    @hookimpl
    def kb_policies(self, config: Config) -> Policy:
        return Policy()


def test_a_hook_returning_no_list_names_its_plugin(make_config: ConfigFactory) -> None:
    with pytest.raises(StartupError, match="must return a list of Policy") as info:
        Plugins(make_config(), extra=[_OnePolicyNotAList()])
    assert "(_OnePolicyNotAList)" in str(info.value)


class _DenyEncrypt(Policy):
    def authorize(self, request: AuthzRequest) -> Decision | None:
        return Decision.DENY if request.operation == "encrypt" else None


class _WrapsPolicies:
    """A hook wrapper (pluggy's new style) adding a policy to what the others provide."""

    @hookimpl(wrapper=True)
    def kb_policies(self, config: Config) -> Generator[None, list[list[Policy]], list[list[Policy]]]:
        provided = yield
        return [*provided, [_DenyEncrypt()]]


def test_provider_hooks_keep_pluggy_wrappers(make_config: ConfigFactory) -> None:
    plugins = Plugins(make_config(), extra=[_WrapsPolicies()])
    assert any(isinstance(policy, _DenyEncrypt) for policy in plugins.policies)
    assert not plugins.authorize(AuthzRequest(f"uid:{os.getuid()}", "encrypt", "k"))
