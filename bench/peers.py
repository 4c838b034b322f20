"""``python -m bench peers [--quick]``: keybroker beside the tools a team could
use instead, on the same work, in one run.

* envelope (in-process) -- keybroker's native batch vs a ``cryptography``
  AESGCM loop, Google Tink (AEAD ``AES256_GCM`` and ``KmsEnvelopeAead`` with a
  local KEK) and the AWS Encryption SDK with a raw AES key (legacy
  ``RawMasterKey`` and the material providers' ``RawAESKeyring``, committing
  suite without signatures), for 32-byte data keys and 4 KiB messages
  (:mod:`bench.peers_envelope`);
* service -- keybroker over its Unix socket vs a PyKMIP server over TLS on
  loopback: key creation, encrypt with 1 and 8 clients, and
  ``encrypt_batch`` items/s vs one KMIP request per item
  (:mod:`bench.peers_service`, :mod:`bench.peers_kmip`);
* HSM -- keybroker's pooled PKCS#11 backend on a SoftHSM2 token, through the
  broker, vs python-pkcs11 on one session (:mod:`bench.peers_hsm`);
* items/s against batch size for all of them, plotted to
  ``bench/results/peers_batch.png`` (:mod:`bench.peers_plot`).

The peers are installed into this interpreter's environment on first run
(:data:`bench.peers_common.PEER_PINS`); they are not keybroker dependencies.
Figures are medians of interleaved repeats; ratios are keybroker / peer.
"""

from __future__ import annotations

import time
from typing import Any

from bench import RESULTS_DIR, _fmt, machine_info

TARGETS = {
    "envelope 32B: native batch / Tink AEAD": 5.0,
    "envelope 32B: native batch / Tink KmsEnvelopeAead": 30.0,
    "envelope 4KiB: native batch / AWS ESDK RawMasterKey": 50.0,
    "envelope 4KiB: native batch / AWS ESDK RawAESKeyring": 50.0,
    "service: create x1": 10.0,
    "service: create x8": 10.0,
    "service: encrypt x1": 50.0,
    "service: encrypt x8": 50.0,
    "service: batch items/s": 2000.0,
}
PLOT = RESULTS_DIR / "peers_batch.png"
COLUMNS = ["section", "figure", "keybroker", "peer", "peer figure", "ratio", "target", ""]


def _settings(quick: bool) -> dict[str, tuple[float, int]]:
    """(seconds per sample, repeats) of each section."""
    if quick:
        return {"envelope": (0.25, 3), "service": (0.4, 2), "hsm": (0.3, 2), "sweep": (0.1, 2)}
    return {"envelope": (1.0, 5), "service": (1.5, 5), "hsm": (1.0, 5), "sweep": (0.4, 3)}


class _Table:
    """Rows of the result table, with ratios and verdicts collected on the way."""

    def __init__(self) -> None:
        self.rows: list[list[object]] = []
        self.ratios: dict[str, float] = {}
        self.verdicts: dict[str, str] = {}

    def compare(
        self, section: str, figure: str, ours: float, peer: str, theirs: float, target_name: str | None
    ) -> None:
        ratio = ours / theirs
        key = target_name or f"{section} {figure}: keybroker / {peer}"
        self.ratios[key] = round(ratio, 3)
        target = TARGETS.get(target_name or "")
        verdict = ""
        if target is not None:
            verdict = "ok" if ratio >= target else "MISSED"
            self.verdicts[key] = verdict
        self.rows.append(
            [section, figure, ours, peer, theirs, ratio, f">= {target:g}" if target else "-", verdict]
        )

    def note(self, section: str, figure: str, text: str) -> None:
        self.rows.append([section, figure, text, "-", "-", "-", "-", ""])


def _envelope_rows(table: _Table, envelope: dict[str, Any]) -> None:
    from bench.peers_envelope import (  # noqa: PLC0415 -- after ensure_peers
        ESDK_KEYRING,
        ESDK_LEGACY,
        NATIVE,
        NATIVE_10,
        NATIVE_SINGLE,
        TINK,
        TINK_ENVELOPE,
    )

    targets = {
        ("32B", TINK): "envelope 32B: native batch / Tink AEAD",
        ("32B", TINK_ENVELOPE): "envelope 32B: native batch / Tink KmsEnvelopeAead",
        ("4KiB", ESDK_LEGACY): "envelope 4KiB: native batch / AWS ESDK RawMasterKey",
        ("4KiB", ESDK_KEYRING): "envelope 4KiB: native batch / AWS ESDK RawAESKeyring",
    }
    for size, result in envelope.items():
        rates = result["items_per_s"]
        batch = f"{size} items/s, {NATIVE} of {result['items']:,}"
        for peer, theirs in rates.items():
            if peer not in (NATIVE, NATIVE_10, NATIVE_SINGLE):
                table.compare("envelope", batch, rates[NATIVE], peer, theirs, targets.get((size, peer)))
        for peer in (ESDK_LEGACY, ESDK_KEYRING):
            for ours in (NATIVE_10, NATIVE_SINGLE) if size == "4KiB" else (NATIVE_SINGLE,):
                table.compare("envelope", f"{size} items/s, {ours}", rates[ours], peer, rates[peer], None)


def _service_rows(table: _Table, service: dict[str, Any]) -> None:
    m = service["medians"]
    n = service["concurrent_clients"]
    for op, unit in (("create", "key creation"), ("encrypt", "encrypt 32 B")):
        peer_op = "Create" if op == "create" else "Encrypt (AES-GCM)"
        for clients in (1, n):
            table.compare(
                "service",
                f"{unit} ops/s, {clients} client{'s' if clients > 1 else ''}",
                m[f"keybroker|{op} x{clients}"],
                f"PyKMIP {peer_op}, TLS",
                m[f"pykmip|{op} x{clients}"],
                f"service: {op} x{clients}",
            )
    single = "PyKMIP Encrypt (AES-GCM), TLS"
    for figure, ours in (
        ("ping ops/s, 1 client (no work: the round-trip floor)", "ping x1"),
        ("encrypt 32 B ops/s, 1 client sleeping for each reply (busy_poll_us=0)", "encrypt x1 blocking"),
        ("ping ops/s, 1 client sleeping for each reply (busy_poll_us=0)", "ping x1 blocking"),
    ):
        table.compare("service", figure, m[f"keybroker|{ours}"], single, m["pykmip|encrypt x1"], None)
    table.compare(
        "service",
        f"items/s, encrypt_batch of {service['batch_items']:,} x 32 B",
        m["keybroker|batch items"],
        "PyKMIP, one Encrypt per item",
        m["pykmip|batch items"],
        "service: batch items/s",
    )
    for name, cpu in service["event_loop_cpu"].items():
        unit = "item" if name.endswith("items") else "request"
        table.note(
            "service",
            f"keybroker event-loop thread, {name.partition('|')[2]}",
            f"{cpu['busy_pct']:.0f}% busy, {cpu['user_us'] + cpu['system_us']:.1f} µs CPU per {unit} "
            f"({cpu['user_us']:.1f} user, {cpu['system_us']:.1f} system)",
        )


def _hsm_rows(table: _Table, hsm: dict[str, Any]) -> None:
    if "unavailable" in hsm:
        table.note("hsm", "every figure", hsm["unavailable"])
        return
    m = hsm["medians"]
    token, copy = m["python-pkcs11|token object"], m["python-pkcs11|session copy"]
    loop = "python-pkcs11 loop, 1 session"
    batch = f"items/s, encrypt_batch of {hsm['batch_items']:,} x 32 B"
    for figure, ours, peer, theirs in (
        ("encrypt 32 B ops/s, 1 client", m["keybroker|encrypt x1"], f"{loop}, token key", token),
        ("encrypt 32 B ops/s, 8 clients", m["keybroker|encrypt x8"], f"{loop}, token key", token),
        (batch, m["keybroker|encrypt_batch 1000"], f"{loop}, token key", token),
        (batch, m["keybroker|encrypt_batch 1000"], f"{loop}, session copy", copy),
    ):
        table.compare("hsm", figure, ours, peer, theirs, None)


def markdown(columns: list[str], rows: list[list[object]]) -> str:
    """The table as GitHub markdown, numbers formatted as in the printed table."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = [_fmt(v) for v in row]
        if cells[-1] in ("ok", "MISSED"):
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    from bench.peers_common import ensure_peers, fsync_latency_us, keybroker_process, versions  # noqa: PLC0415

    installed = ensure_peers()
    from bench import peers_envelope, peers_hsm, peers_plot, peers_service  # noqa: PLC0415
    from bench.peers_kmip import kmip_server  # noqa: PLC0415

    settings = _settings(quick)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    contenders, release = peers_envelope.contenders()
    try:
        seconds, repeats = settings["envelope"]
        envelope = peers_envelope.measure(contenders, quick=quick, seconds=seconds, repeats=repeats)
        timings["envelope"] = time.perf_counter() - started
        with keybroker_process() as socket_path, kmip_server() as endpoint:
            seconds, repeats = settings["service"]
            service = peers_service.measure(
                socket_path, endpoint, quick=quick, seconds=seconds, repeats=repeats
            )
            timings["service"] = time.perf_counter() - started
            seconds, repeats = settings["sweep"]
            swept = [c for c in contenders if c.name != peers_envelope.NATIVE_10]  # the sweep varies n itself
            curves = peers_plot.sweep(swept, socket_path, endpoint, seconds=seconds, repeats=repeats)
            timings["sweep"] = time.perf_counter() - started
    finally:
        release()
    seconds, repeats = settings["hsm"]
    hsm = peers_hsm.measure(seconds=seconds, repeats=repeats)
    timings["hsm"] = time.perf_counter() - started

    machine = {**machine_info(), "fsync_us_tmp": round(fsync_latency_us(), 1)}
    peer_versions = versions()
    note = (
        f"python -m bench peers{' --quick' if quick else ''}; "
        f"{machine['cpus']} CPUs, {machine['cpu_model']}; "
        f"tink {peer_versions['tink']}, aws-encryption-sdk {peer_versions['aws-encryption-sdk']}, "
        f"pykmip {peer_versions['pykmip']}; medians of {settings['sweep'][1]}"
    )
    peers_plot.draw(curves, PLOT, note)

    table = _Table()
    _envelope_rows(table, envelope)
    _service_rows(table, service)
    _hsm_rows(table, hsm)
    return {
        "name": "peers",
        "quick": quick,
        "settings": {name: {"seconds": s, "repeats": r} for name, (s, r) in settings.items()},
        "machine": machine,
        "versions": peer_versions,
        "installed_now": installed,
        "columns": COLUMNS,
        "rows": table.rows,
        "ratios": table.ratios,
        "targets": TARGETS,
        "verdicts": table.verdicts,
        "envelope": envelope,
        "service": service,
        "hsm": hsm,
        "batch_sweep": curves,
        "plot": str(PLOT.relative_to(RESULTS_DIR.parent.parent)),
        "elapsed_s": {name: round(t, 1) for name, t in timings.items()},  # since start, at each end
        "markdown": markdown(COLUMNS, table.rows),
    }
