"""Coverage-guided fuzz targets (atheris) for the parsers that face the network.

Run one target: ``python tests/fuzz/fuzz_targets.py TARGET [libFuzzer flags]``,
e.g. ``-max_total_time=60``. A target's only allowed failures are the
documented ones; anything else is a crash that libFuzzer reports and saves.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    import msgpack

    from broker import envelope, params, protocol
    from broker.calls import Method
    from broker.errors import DecryptionFailed, InvalidArgument
    from broker.rpc import METHODS

MAX_MESSAGE = 1 << 16


def decoder(data: bytes) -> None:
    """A request stream fed in arbitrary slices: events or ProtocolError, nothing else."""
    fdp = atheris.FuzzedDataProvider(data)
    dec = protocol.RequestDecoder(MAX_MESSAGE)
    try:
        while fdp.remaining_bytes():
            events = dec.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))
            for event in events:
                assert isinstance(event, protocol.Request | protocol.BadRequest)
                if isinstance(event, protocol.Request):
                    assert isinstance(event.method, str) and isinstance(event.params, dict)
                    assert 0 <= event.msgid < 2**32
    except protocol.ProtocolError:
        pass


def header(data: bytes) -> None:
    """Envelope headers: a Header or DecryptionFailed, nothing else."""
    try:
        parsed = envelope.parse_header(data)
    except DecryptionFailed:
        return
    assert envelope.pack_header(parsed.key_id, parsed.version, parsed.nonce, parsed.algorithm) == data[:36]


_TABLE: list[tuple[str, Method]] = sorted(METHODS.items())


def method_params(data: bytes) -> None:
    """Any decoded map against any method's spec: parsed or InvalidArgument."""
    fdp = atheris.FuzzedDataProvider(data)
    _, method = _TABLE[fdp.ConsumeIntInRange(0, len(_TABLE) - 1)]
    try:
        value = msgpack.unpackb(fdp.ConsumeBytes(fdp.remaining_bytes()), raw=False, strict_map_key=False)
    except Exception:
        return
    if not isinstance(value, dict):
        return
    with contextlib.suppress(InvalidArgument):
        params.parse(method.spec, value)


TARGETS = {"decoder": decoder, "header": header, "params": method_params}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
