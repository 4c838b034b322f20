"""``python -m bench pkcs11 [--quick] [--stress SECONDS]``: the hsm backend's
session pool on a SoftHSM2 token, beside the ways one could do without it.

A token is initialized in a temporary directory (SOFTHSM2_CONF points there)
and one AES-256 token key is generated. Every figure seals with that key into
the same format-1 envelope (random 12-byte nonce, 36-byte header as GCM aad),
32-byte plaintexts, medians of interleaved repeats:

  encrypt_32B x8        single-item encrypt, 8 concurrent callers (ops/s)
  batch_1000 x1         one caller, encrypt_batch of 1,000 items (items/s)
  batch_1000 x8         8 concurrent callers, 1,000-item batches (items/s)

for each of
  pool N                Pkcs11Backend on a SessionPool of N sessions (N = 1, 2, 4)
  shared session        one logged-in session shared by every caller under a lock
  open+login per call   a session opened, logged in, used and closed per call
                        (calls serialize: login state is per application, so
                        two at once log each other out)
and, for batches, python-pkcs11 called directly in a loop on one session:
  direct loop (token object)   the version's token key, as a user would write it
  direct loop (session copy)   a session copy of it, which the backend uses

Then a stress run in a child process (so that a crash of the module is
counted, not fatal to the bench): 8 concurrent callers on a pool of 4 doing
encrypt/decrypt, batches, MACs and signatures for ``--stress`` seconds
(default 10, ``--quick`` 3); it reports operations, errors and the exit code.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from bench import machine_info, median

CALLERS = 8
ITEM = bytes(range(32))
BATCH = 1000
PIN_ENV = "KEYBROKER_BENCH_PKCS11_PIN"
TOKEN_LABEL = "kb-bench"
TARGETS = {
    "pool 2 / pool 1, encrypt_32B x8": 1.4,
    "pool 4 / open+login per call, encrypt_32B x8": 20.0,
    "pool 4 / direct loop (token object), batch_1000 x1": 0.8,
}


# --- the contenders (blocking parts run in worker threads) ----------------------------


def _seal_loop(key: Any, prefix: bytes, items: list[bytes]) -> list[bytes]:
    from pkcs11 import Mechanism  # noqa: PLC0415
    from pkcs11.mechanisms import GCMParams  # noqa: PLC0415

    out = []
    for item in items:
        nonce = os.urandom(12)
        header = prefix + nonce
        out.append(
            header
            + key.encrypt(item, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, header, 128))
        )
    return out


def _find(session: Any, object_id: bytes) -> Any:
    from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415

    [key] = session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: object_id, Attribute.TOKEN: True}
    )
    return key


class SharedSession:
    """One logged-in python-pkcs11 session for every caller, one call at a time."""

    def __init__(self, token: Any, pin: str, object_id: bytes, prefix: bytes) -> None:
        self._session = token.open(rw=True, user_pin=pin)
        self._key = _find(self._session, object_id)
        self._prefix = prefix
        self._lock = threading.Lock()

    def call(self, items: list[bytes]) -> list[bytes]:
        with self._lock:
            return _seal_loop(self._key, self._prefix, items)

    def close(self) -> None:
        self._session.close()


class OpenPerCall:
    """Open a session, log in, find the key, seal, log out and close, per call."""

    def __init__(self, token: Any, pin: str, object_id: bytes, prefix: bytes) -> None:
        self._token, self._pin, self._id, self._prefix = token, pin, object_id, prefix
        # Login state is per application: two of these at once would fail
        # with UserAlreadyLoggedIn or log the other out, so they take turns.
        self._lock = threading.Lock()

    def call(self, items: list[bytes]) -> list[bytes]:
        with self._lock, self._token.open(rw=True, user_pin=self._pin) as session:
            return _seal_loop(_find(session, self._id), self._prefix, items)


def direct_loop(token: Any, pin: str, object_id: bytes, prefix: bytes, *, copy: bool) -> float:
    """Items/s of python-pkcs11 sealing BATCH items in a plain loop on one session."""
    from pkcs11 import Attribute  # noqa: PLC0415

    items = [ITEM] * BATCH
    with token.open(rw=True, user_pin=pin) as session:
        key = _find(session, object_id)
        if copy:
            key = key.copy({Attribute.TOKEN: False})
        _seal_loop(key, prefix, items[:50])  # warm
        rates = []
        for _ in range(3):
            started = time.perf_counter()
            _seal_loop(key, prefix, items)
            rates.append(BATCH / (time.perf_counter() - started))
        if copy:
            key.destroy()
    return median(rates)


class _GcmParams(ctypes.Structure):
    _fields_ = [
        ("pIv", ctypes.c_char_p), ("ulIvLen", ctypes.c_ulong), ("ulIvBits", ctypes.c_ulong),
        ("pAAD", ctypes.c_char_p), ("ulAADLen", ctypes.c_ulong), ("ulTagBits", ctypes.c_ulong),
    ]  # fmt: skip


class _Mechanism(ctypes.Structure):
    _fields_ = [
        ("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p), ("ulParameterLen", ctypes.c_ulong),
    ]  # fmt: skip


_CKM_AES_GCM = 0x1087


def _ctypes_sealer(module: str, session: Any, key: Any, prefix: bytes) -> Callable[[], None]:
    """One 32-byte AES-GCM seal per call through the module's own C_EncryptInit/C_Encrypt.

    ctypes releases the GIL for the length of each call, so this measures
    whether the token itself runs two sessions at once.
    """
    dll = ctypes.CDLL(module)
    init, encrypt = dll.C_EncryptInit, dll.C_Encrypt
    handle, key_handle = session.handle, key.handle
    out = ctypes.create_string_buffer(len(ITEM) + 16)
    out_len = ctypes.c_ulong()

    def seal() -> None:
        header = prefix + os.urandom(12)
        params = _GcmParams(header[-12:], 12, 96, header, len(header), 128)
        pointer = ctypes.cast(ctypes.pointer(params), ctypes.c_void_p)
        mech = _Mechanism(_CKM_AES_GCM, pointer, ctypes.sizeof(params))
        out_len.value = len(out)
        if init(handle, ctypes.byref(mech), key_handle) != 0 or encrypt(
            handle, ITEM, len(ITEM), out, ctypes.byref(out_len)
        ) != 0:
            raise RuntimeError("C_EncryptInit/C_Encrypt failed")

    return seal


def thread_rate(
    token: Any, pin: str, object_id: bytes, prefix: bytes, *, threads: int, seconds: float, module: str | None
) -> float:
    """Ops/s of ``threads`` plain threads, each sealing 32 bytes in a loop on its own session
    (and its own session copy of the key): through python-pkcs11 (``module`` None), or
    through the module's C functions called with ctypes. No trio, no pool: the most any
    session pool could get from this token with that many sessions."""
    from pkcs11 import Attribute  # noqa: PLC0415

    first = token.open(rw=True, user_pin=pin)  # the login is per application: one for all
    sessions = [first] + [token.open(rw=True) for _ in range(threads - 1)]
    keys = [_find(s, object_id).copy({Attribute.TOKEN: False}) for s in sessions]
    stop = threading.Event()
    counts = [0] * threads

    def loop(index: int) -> None:
        if module is None:
            key, items = keys[index], [ITEM]
            seal = lambda: _seal_loop(key, prefix, items)  # noqa: E731
        else:
            seal = _ctypes_sealer(module, sessions[index], keys[index], prefix)
        while not stop.is_set():
            seal()
            counts[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    try:
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()
        return sum(counts) / (time.perf_counter() - started)
    finally:
        for key in keys:
            key.destroy()
        for session in reversed(sessions):
            session.close()


async def _rate(
    call: Callable[[], Awaitable[object]], *, callers: int, seconds: float, per_call: int
) -> float:
    """Units per second with ``callers`` tasks calling until the time is up."""
    done = 0
    deadline = trio.current_time() + seconds

    async def caller() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return done * per_call / (time.perf_counter() - started)


# --- measurement ----------------------------------------------------------------------------


async def measure(settings: Any, *, seconds: float, repeats: int) -> dict[str, list[float]]:
    import keybroker_pkcs11 as plugin  # noqa: PLC0415
    from keybroker_pkcs11._cryptoki import load_library  # noqa: PLC0415

    from broker.envelope import pack_header  # noqa: PLC0415
    from broker.keys import KeyType, VersionRef  # noqa: PLC0415

    library, _ = load_library(settings.module)
    token = library.get_token(token_label=settings.token_label)
    pin = settings.pin.decode()
    key_id = os.urandom(16)
    maker = plugin.Pkcs11Backend(plugin.open_pool(settings))
    await maker.open()
    ref = VersionRef(key_id, 1, KeyType.AES256_GCM, await maker.generate(key_id, 1, KeyType.AES256_GCM))
    await maker.aclose()
    object_id = ref.material[4:]
    prefix = pack_header(key_id, 1, bytes(12))[:24]
    one, batch = [ITEM], [ITEM] * BATCH
    samples: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    async def contender(label: str, call: Callable[[list[bytes]], Awaitable[object]]) -> None:
        record(
            f"{label}|encrypt_32B x8",
            await _rate(lambda: call(one), callers=CALLERS, seconds=seconds, per_call=1),
        )
        record(
            f"{label}|batch_1000 x1",
            await _rate(lambda: call(batch), callers=1, seconds=seconds, per_call=BATCH),
        )
        record(
            f"{label}|batch_1000 x8",
            await _rate(lambda: call(batch), callers=CALLERS, seconds=seconds, per_call=BATCH),
        )

    for _ in range(repeats):
        # Pools (each phase alone: a login elsewhere in the process would
        # collide with the plain python-pkcs11 contenders' logins).
        for size in (1, 2, 4):
            backend = plugin.Pkcs11Backend(plugin.open_pool(replace(settings, pool_size=size)))
            await backend.open()
            try:
                await backend.encrypt(ref, batch[:CALLERS], b"")  # warm: sessions open, copies made
                await contender(f"pool {size}", lambda items, b=backend: b.encrypt(ref, items, b""))
            finally:
                await backend.aclose()
        shared = await trio.to_thread.run_sync(SharedSession, token, pin, object_id, prefix)
        try:
            await contender("shared session", lambda items, s=shared: trio.to_thread.run_sync(s.call, items))
        finally:
            await trio.to_thread.run_sync(shared.close)
        naive = OpenPerCall(token, pin, object_id, prefix)
        await contender("open+login per call", lambda items, n=naive: trio.to_thread.run_sync(n.call, items))
        for threads in (1, 2):
            for via, module in (("python-pkcs11", None), ("ctypes C_Encrypt", settings.module)):
                rate = await trio.to_thread.run_sync(
                    lambda n=threads, m=module: thread_rate(
                        token, pin, object_id, prefix, threads=n, seconds=seconds, module=m
                    )
                )
                record(f"{via} alone, {threads} thread(s) x own session|encrypt_32B x8", rate)
        for copy in (False, True):
            label = "direct loop (session copy)" if copy else "direct loop (token object)"
            rate = await trio.to_thread.run_sync(
                lambda c=copy: direct_loop(token, pin, object_id, prefix, copy=c)
            )
            record(f"{label}|batch_1000 x1", rate)
    return samples


# --- stress ---------------------------------------------------------------------------------


async def stress(
    settings: Any, seconds: float, *, callers: int = CALLERS, pool_size: int = 4
) -> dict[str, Any]:
    """``callers`` tasks on a pool of ``pool_size`` doing a mix of operations for ``seconds``."""
    import keybroker_pkcs11 as plugin  # noqa: PLC0415

    from broker.keys import KeyType, VersionRef  # noqa: PLC0415

    backend = plugin.Pkcs11Backend(plugin.open_pool(replace(settings, pool_size=pool_size)))
    await backend.open()
    refs = {}
    for key_type in (KeyType.AES256_GCM, KeyType.HMAC_SHA256, KeyType.ECDSA_P256):
        key_id = os.urandom(16)
        refs[key_type] = VersionRef(key_id, 1, key_type, await backend.generate(key_id, 1, key_type))
    aes, mac, ec = refs[KeyType.AES256_GCM], refs[KeyType.HMAC_SHA256], refs[KeyType.ECDSA_P256]
    ops = 0
    errors: list[str] = []
    deadline = trio.current_time() + seconds

    async def caller(n: int) -> None:
        nonlocal ops
        i = 0
        while trio.current_time() < deadline:
            i += 1
            try:
                kind = (n + i) % 10
                if kind < 6:
                    plain = os.urandom(32)
                    sealed = await backend.encrypt(aes, [plain], b"s")
                    if await backend.decrypt(aes, sealed, b"s") != [plain]:
                        errors.append("round trip mismatch")
                elif kind < 8:
                    items = [os.urandom(32) for _ in range(100)]
                    if await backend.decrypt(aes, await backend.encrypt(aes, items, b""), b"") != items:
                        errors.append("batch mismatch")
                elif kind == 8:
                    if not await backend.verify_mac(mac, b"m%d" % i, await backend.mac(mac, b"m%d" % i)):
                        errors.append("mac mismatch")
                else:
                    signature = await backend.sign(ec, b"s%d" % i, prehashed=False)
                    if not await backend.verify(ec, b"s%d" % i, signature, prehashed=False):
                        errors.append("signature mismatch")
                ops += 1
            except Exception as exc:  # counted, not fatal: the figure is the error count
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            for n in range(callers):
                nursery.start_soon(caller, n)
    finally:
        elapsed = time.perf_counter() - started
        counters = backend.pool.counters.snapshot()
        await backend.aclose()
    return {
        "seconds": elapsed,
        "callers": callers,
        "pool_size": pool_size,
        "operations": ops,
        "ops_per_s": ops / elapsed,
        "errors": len(errors),
        "first_errors": errors[:5],
        "peak_open_sessions": counters.peak_open,
        "session_errors": counters.errors,
        "timeouts": counters.timeouts,
    }


def _stress_child(seconds: float) -> None:
    import keybroker_pkcs11 as plugin  # noqa: PLC0415

    settings = plugin.Pkcs11Settings.from_mapping(
        {"module": os.environ["KB_BENCH_MODULE"], "token_label": TOKEN_LABEL, "pin_env": PIN_ENV}
    )
    print(json.dumps(trio.run(stress, settings, seconds)))


def _run_stress(seconds: float, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pkcs11", "--stress-child", str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, Any] = {"exit_code": proc.returncode, "crashes": int(proc.returncode != 0)}
    if proc.returncode == 0:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


# --- the runner's entry point ------------------------------------------------------------


def run(quick: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench pkcs11")
    parser.add_argument("--stress", type=float, default=None, help="stress run length in seconds")
    opts = parser.parse_args(argv or [])
    stress_s = opts.stress if opts.stress is not None else (3.0 if quick else 10.0)
    seconds, repeats = (0.3, 3) if quick else (1.0, 5)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))
    from tests.hsm_fixtures import USER_PIN, init_token, softhsm_module  # noqa: PLC0415

    module = softhsm_module()
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (softhsm2-util, libsofthsm2.so)")
    directory = Path(tempfile.mkdtemp(prefix="kb-bench-hsm-", dir="/tmp"))
    try:
        conf = init_token(directory, TOKEN_LABEL)
        # Before the module is first loaded: SoftHSM2 reads it at C_Initialize.
        os.environ["SOFTHSM2_CONF"] = str(conf)
        os.environ[PIN_ENV] = USER_PIN
        import keybroker_pkcs11 as plugin  # noqa: PLC0415

        settings = plugin.Pkcs11Settings.from_mapping(
            {"module": module, "token_label": TOKEN_LABEL, "pin_env": PIN_ENV}
        )
        samples = trio.run(lambda: measure(settings, seconds=seconds, repeats=repeats))
        env = {**os.environ, "KB_BENCH_MODULE": module, "PYTHONPATH": os.pathsep.join(sys.path)}
        stress_result = _run_stress(stress_s, env)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return _report(samples, stress_result, quick=quick, seconds=seconds, repeats=repeats, module=module)


def _report(
    samples: dict[str, list[float]],
    stress_result: dict[str, Any],
    *,
    quick: bool,
    seconds: float,
    repeats: int,
    module: str,
) -> dict[str, Any]:
    medians = {key: median(values) for key, values in samples.items()}
    figures = ["encrypt_32B x8", "batch_1000 x1", "batch_1000 x8"]
    contenders: list[str] = []
    for key in samples:
        label = key.split("|")[0]
        if label not in contenders:
            contenders.append(label)
    rows = [[label, *(medians.get(f"{label}|{fig}", "-") for fig in figures)] for label in contenders]

    def m(label: str, figure: str) -> float:
        return medians[f"{label}|{figure}"]

    ratios = {
        "pool 2 / pool 1, encrypt_32B x8": m("pool 2", "encrypt_32B x8") / m("pool 1", "encrypt_32B x8"),
        "pool 4 / pool 1, encrypt_32B x8": m("pool 4", "encrypt_32B x8") / m("pool 1", "encrypt_32B x8"),
        "pool 4 / open+login per call, encrypt_32B x8": m("pool 4", "encrypt_32B x8")
        / m("open+login per call", "encrypt_32B x8"),
        "pool 4 / shared session, encrypt_32B x8": m("pool 4", "encrypt_32B x8")
        / m("shared session", "encrypt_32B x8"),
        "pool 4 / direct loop (token object), batch_1000 x1": m("pool 4", "batch_1000 x1")
        / m("direct loop (token object)", "batch_1000 x1"),
        "pool 4 / direct loop (session copy), batch_1000 x1": m("pool 4", "batch_1000 x1")
        / m("direct loop (session copy)", "batch_1000 x1"),
        "pool 4 / pool 1, batch_1000 x8": m("pool 4", "batch_1000 x8") / m("pool 1", "batch_1000 x8"),
        # The ceiling of the first ratio: what a second session gives the binding itself.
        "python-pkcs11 alone, 2 threads / 1 thread, encrypt_32B": m(
            "python-pkcs11 alone, 2 thread(s) x own session", "encrypt_32B x8"
        )
        / m("python-pkcs11 alone, 1 thread(s) x own session", "encrypt_32B x8"),
        # The same with the GIL released for every token call: the token's own scaling.
        "ctypes C_Encrypt alone, 2 threads / 1 thread, encrypt_32B": m(
            "ctypes C_Encrypt alone, 2 thread(s) x own session", "encrypt_32B x8"
        )
        / m("ctypes C_Encrypt alone, 1 thread(s) x own session", "encrypt_32B x8"),
    }
    rows.append(["", "", "", ""])
    for name, value in ratios.items():
        target = TARGETS.get(name)
        rows.append([f"ratio {name}", f"{value:.2f}", f"target >= {target}" if target else "", ""])
    rows.append(
        [
            f"stress {stress_result.get('seconds', 0):.0f} s, 8 callers, pool 4",
            f"{stress_result.get('operations', 0)} ops",
            f"{stress_result.get('errors', 'n/a')} errors",
            f"{stress_result['crashes']} crashes",
        ]
    )
    try:
        from importlib.metadata import version  # noqa: PLC0415

        binding = version("python-pkcs11")
    except Exception:  # informational only
        binding = None
    softhsm = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True, check=False)
    return {
        "name": "pkcs11",
        "quick": quick,
        "seconds_per_sample": seconds,
        "repeats": repeats,
        "machine": {
            **machine_info(),
            "python_pkcs11": binding,
            "softhsm2": softhsm.stdout.strip(),
            "module": module,
        },
        "columns": ["contender", "encrypt_32B x8 ops/s", "batch_1000 x1 items/s", "batch_1000 x8 items/s"],
        "rows": rows,
        "medians": medians,
        "samples": samples,
        "ratios": ratios,
        "targets": TARGETS,
        "stress": stress_result,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--stress-child":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))
        _stress_child(float(sys.argv[2]))
    else:
        raise SystemExit("run as: python -m bench pkcs11 [--quick] [--stress SECONDS]")
