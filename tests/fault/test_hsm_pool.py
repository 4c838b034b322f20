"""The PKCS#11 session pool under faults, on a real SoftHSM2 token: sessions
closed behind its back in the middle of load, a token that goes away and comes
back, waiters past the deadline, cancellation, and 500 concurrent requests on
four sessions."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from broker.app import open_broker
from broker.client import AsyncClient
from broker.errors import Unavailable
from broker.keys import KeyType, VersionRef
from broker.server import serve
from tests import hsm_fixtures
from tests.conftest import ConfigFactory
from tests.hsm_fixtures import SoftToken

softhsm = hsm_fixtures.softhsm  # the session's SoftHSM2 token fixture


def _plugin() -> Any:
    import keybroker_pkcs11  # noqa: PLC0415 - needs python-pkcs11, checked by the fixture

    return keybroker_pkcs11


class SwitchableSource:
    """A TokenSessions whose token can be made to look absent (C_OpenSession fails)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def open(self) -> Any:
        if self.down:
            from pkcs11.exceptions import TokenNotPresent  # noqa: PLC0415

            raise TokenNotPresent()
        return self.inner.open()

    def close(self, session: Any) -> None:
        self.inner.close(session)

    def alive(self, session: Any) -> bool:
        return bool(self.inner.alive(session))


@asynccontextmanager
async def backend_on(
    token: SoftToken, *, size: int, wait: float = 5.0, switchable: bool = False
) -> AsyncIterator[Any]:
    plugin = _plugin()
    from keybroker_pkcs11.pool import TokenSessions  # noqa: PLC0415

    settings = plugin.Pkcs11Settings.from_mapping(token.section())
    source: Any = TokenSessions(settings.module, settings.token_label, settings.pin)
    if switchable:
        source = SwitchableSource(source)
    backend = plugin.Pkcs11Backend(plugin.SessionPool(source, size=size, wait_timeout_s=wait))
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


async def aes_ref(backend: Any) -> VersionRef:
    key_id = os.urandom(16)
    material = await backend.generate(key_id, 1, KeyType.AES256_GCM)
    return VersionRef(key_id, 1, KeyType.AES256_GCM, material)


def _cryptoki(pool: Any) -> Any:
    source = pool.source
    return (source.inner if isinstance(source, SwitchableSource) else source).cryptoki


async def test_sessions_closed_behind_the_pools_back_mid_load(softhsm: SoftToken) -> None:
    async with backend_on(softhsm, size=4) as backend:
        pool = backend.pool
        cryptoki = _cryptoki(pool)
        ref = await aes_ref(backend)
        items = [os.urandom(32) for _ in range(10)]
        done = 0
        closed_behind = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(40):
                sealed = await backend.encrypt(ref, items, b"aad")
                assert await backend.decrypt(ref, sealed, b"aad") == items
                done += 1
                # A pause now and then leaves sessions idle for the saboteur.
                await trio.sleep(0.002)

        async def saboteur() -> None:
            # Close the idle sessions through the library itself, between loans:
            # C_CloseSession on a handle the pool still believes open. (Never
            # under a running call: SoftHSM2 2.6 then frees the session under
            # the caller and crashes the process -- measured.)
            nonlocal closed_behind
            while done < 16 * 40:
                await trio.sleep(0.003)
                for lease in pool.idle:
                    if lease.alive():  # one closed last round may not have been lent since
                        cryptoki.close_session(lease.session.handle)
                        closed_behind += 1

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(worker)
            nursery.start_soon(saboteur)
        counters = pool.counters.snapshot()
        assert done == 16 * 40
        assert closed_behind > 0
        assert counters.errors > 0 and counters.replacements > 0, counters
        assert counters.timeouts == 0 and counters.peak_open <= 4
        # Sessions closed in the last round are noticed when next lent.
        for _ in range(6):
            assert await backend.decrypt(ref, await backend.encrypt(ref, items, b""), b"") == items


async def test_all_sessions_closed_and_logged_out(softhsm: SoftToken) -> None:
    """C_CloseAllSessions also logs the application out: fresh sessions log in again."""
    async with backend_on(softhsm, size=3) as backend:
        pool = backend.pool
        ref = await aes_ref(backend)
        sealed = await backend.encrypt(ref, [b"before"], b"")
        await trio.to_thread.run_sync(_cryptoki(pool).close_all_sessions, pool.source.slot_id())
        assert await backend.decrypt(ref, sealed, b"") == [b"before"]
        assert pool.counters.replacements >= 1


async def test_token_unavailable_then_back(softhsm: SoftToken) -> None:
    wait = 1.0
    async with backend_on(softhsm, size=2, wait=wait, switchable=True) as backend:
        pool = backend.pool
        ref = await aes_ref(backend)
        sealed = await backend.encrypt(ref, [b"kept"], b"")
        # The token goes away: its sessions die (nothing is mid-call now) and
        # no new one opens.
        await trio.to_thread.run_sync(_cryptoki(pool).close_all_sessions, pool.source.inner.slot_id())
        pool.source.down = True
        outcomes: list[tuple[str, float]] = []

        async def call() -> None:
            started = trio.current_time()
            try:
                await backend.decrypt(ref, sealed, b"")
                outcomes.append(("ok", trio.current_time() - started))
            except Unavailable:
                outcomes.append(("unavailable", trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(call)
        assert [kind for kind, _ in outcomes] == ["unavailable"] * 10
        assert max(elapsed for _, elapsed in outcomes) < wait + 0.5
        assert pool.counters.open_failures >= 1
        # It comes back: the next call opens and logs in a fresh session.
        pool.source.down = False
        assert await backend.decrypt(ref, sealed, b"") == [b"kept"]
        assert pool.counters.in_use == 0


async def test_waiter_past_deadline_and_cancellation_return_the_loan(softhsm: SoftToken) -> None:
    async with backend_on(softhsm, size=1, wait=0.3) as backend:
        pool = backend.pool
        ref = await aes_ref(backend)
        release = threading.Event()

        def hold(lease: Any) -> None:
            release.wait(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, hold)
            await trio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(Unavailable, match="no PKCS#11 session"):
                await backend.encrypt(ref, [b"x"], b"")
            assert 0.25 < time.monotonic() - started < 1.5
            # A caller cancelled while waiting leaves the queue ...
            with trio.move_on_after(0.05):
                await backend.encrypt(ref, [b"x"], b"")
            release.set()
        # ... and one cancelled while its call runs gets its session back.
        with trio.move_on_after(0.01):
            await pool.run(lambda lease: time.sleep(0.1))
        counters = pool.counters.snapshot()
        assert counters.in_use == 0 and counters.timeouts >= 1 and counters.open == 1
        assert await backend.decrypt(ref, await backend.encrypt(ref, [b"y"], b""), b"") == [b"y"]


async def test_500_concurrent_requests_on_four_sessions(
    softhsm: SoftToken, make_config: ConfigFactory
) -> None:
    config = make_config({"plugins": {"pkcs11": softhsm.section(pool_size=4)}})
    async with open_broker(config) as broker, trio.open_nursery() as nursery:
        info = await nursery.start(serve, config, broker.dispatcher)
        pool = broker.backends["hsm"].pool  # type: ignore[attr-defined]
        cryptoki = _cryptoki(pool)
        async with AsyncClient(info.socket_path) as admin:
            await admin.key_create("load", "aes256-gcm", protection="hsm")
        ceiling = 0
        stop = threading.Event()

        def sample() -> None:
            # The module's own view: count the handles that are live sessions
            # (SoftHSM2 numbers sessions and objects from one counter).
            nonlocal ceiling
            while not stop.is_set():
                top = max([lease.session.handle for lease in pool.idle] + [64]) + 4096
                ceiling = max(ceiling, cryptoki.live_sessions(range(1, top)))
                time.sleep(0.005)

        answers: list[bytes] = []

        async def one_connection(n: int) -> None:
            async with AsyncClient(info.socket_path) as client:

                async def request(i: int) -> None:
                    plaintext = b"%d/%d" % (n, i)
                    sealed = (await client.encrypt("load", plaintext))["ciphertext"]
                    answers.append(sealed)

                async with trio.open_nursery() as inner:
                    for i in range(100):
                        inner.start_soon(request, i)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            async with trio.open_nursery() as clients:
                for n in range(5):
                    clients.start_soon(one_connection, n)
        finally:
            stop.set()
            await trio.to_thread.run_sync(sampler.join)
        assert len(answers) == 500
        counters = pool.counters.snapshot()
        assert counters.peak_open <= 4 and counters.peak_in_use <= 4, counters
        assert counters.timeouts == 0 and counters.errors == 0
        # Concurrent single-item calls on one key shared loans.
        assert counters.loans < 500, counters
        assert 1 <= ceiling <= 4, ceiling
        async with AsyncClient(info.socket_path) as client:
            opened = await client.decrypt_batch(answers[:50])
            assert all(p is not None for p in opened["plaintexts"])
        info.shutdown.set()


async def test_coalesced_callers_survive_a_cancelled_runner(softhsm: SoftToken) -> None:
    """The caller whose task runs a shared loan is cancelled while it waits for a
    session: the callers whose items it had taken are served by another."""
    async with backend_on(softhsm, size=1, wait=5.0) as backend:
        pool = backend.pool
        ref = await aes_ref(backend)
        release = threading.Event()
        results: dict[int, list[bytes | None]] = {}

        async def caller(i: int) -> None:
            sealed = await backend.encrypt(ref, [b"%d" % i], b"")
            results[i] = await backend.decrypt(ref, sealed, b"")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, lambda lease: release.wait(10))
            await trio.sleep(0.05)
            # This caller becomes the group's runner and waits for the session.
            runner_scope = trio.CancelScope()
            nursery.start_soon(_cancellable, runner_scope, backend, ref)
            await trio.sleep(0.05)
            for i in range(5):
                nursery.start_soon(caller, i)
            await trio.sleep(0.05)
            runner_scope.cancel()
            await trio.sleep(0.05)
            release.set()
        assert results == {i: [b"%d" % i] for i in range(5)}
        assert pool.counters.in_use == 0


async def _cancellable(scope: trio.CancelScope, backend: Any, ref: VersionRef) -> None:
    with scope:
        await backend.encrypt(ref, [b"first"], b"")


async def test_short_stress_has_no_errors(softhsm: SoftToken) -> None:
    """A short version of ``python -m bench pkcs11 --stress``: 8 callers, pool of 4."""
    from bench.pkcs11 import stress  # noqa: PLC0415

    settings = _plugin().Pkcs11Settings.from_mapping(softhsm.section())
    result = await stress(settings, 2.0)
    assert result["errors"] == 0, result["first_errors"]
    assert result["operations"] > 100 and result["peak_open_sessions"] <= 4


async def test_a_generation_whose_reply_was_lost_leaves_one_object_per_id(
    softhsm: SoftToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token makes the key pair, then the session fails: the pool's retry
    must neither reuse the id (two objects under one version: unusable) nor
    leave the first attempt's objects behind."""
    from keybroker_pkcs11 import backend as backend_module  # noqa: PLC0415
    from pkcs11 import Attribute  # noqa: PLC0415
    from pkcs11.exceptions import DeviceError  # noqa: PLC0415

    real = backend_module.generate
    ids: list[bytes] = []

    def lost_reply(session: Any, key_type: KeyType, object_id: bytes, label: str) -> Any:
        made = real(session, key_type, object_id, label)
        ids.append(object_id)
        if len(ids) == 1:
            raise DeviceError()
        return made

    monkeypatch.setattr(backend_module, "generate", lost_reply)
    async with backend_on(softhsm, size=2) as backend:
        key_id = os.urandom(16)
        material = await backend.generate(key_id, 1, KeyType.ECDSA_P256)
        ref = VersionRef(key_id, 1, KeyType.ECDSA_P256, material)
        assert await backend.sign(ref, b"message", prehashed=False)
        assert len(ids) == 2 and ids[0] != ids[1]

        def objects(lease: Any) -> list[tuple[bytes, bool]]:
            return [
                (bytes(obj[Attribute.ID]), bool(obj[Attribute.SIGN_RECOVER]))
                for object_id in ids
                for obj in lease.session.get_objects({Attribute.ID: object_id, Attribute.TOKEN: True})
                if int(obj[Attribute.CLASS]) == 3  # CKO_PRIVATE_KEY
            ]

        # One private key, under the second id, which cannot sign-recover (raw RSA).
        assert await backend.pool.run(objects) == [(ids[1], False)]


async def test_a_version_destroyed_by_another_broker_leaves_no_session_copy(softhsm: SoftToken) -> None:
    """Another broker can destroy the token object but not this broker's session
    copy; once the core tells the backend the key changed (``forget``, as it
    does on the cluster's notice), the copy is destroyed too."""
    from keybroker_pkcs11.backend import object_id_of  # noqa: PLC0415
    from pkcs11 import Attribute  # noqa: PLC0415

    async with backend_on(softhsm, size=1) as backend:
        ref = await aes_ref(backend)
        sealed = await backend.encrypt(ref, [b"secret"], b"")  # the session now holds a copy
        object_id = object_id_of(ref)
        hsm_fixtures.destroy_elsewhere(softhsm, object_id)

        def objects(lease: Any) -> list[bool]:
            found = lease.session.get_objects({Attribute.ID: object_id})
            return [bool(obj[Attribute.TOKEN]) for obj in found]

        assert await backend.pool.run(objects) == [False]  # only this session's copy is left
        backend.forget(ref.key_id)
        with pytest.raises(Unavailable, match="no object"):
            await backend.decrypt(ref, sealed, b"")
        assert await backend.pool.run(objects) == []
