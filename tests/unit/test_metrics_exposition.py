"""The request metrics export exactly what prometheus-client's own types would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics

observations = st.lists(
    st.tuples(
        st.sampled_from(["encrypt", "decrypt", "encrypt_batch", "key.get"]),
        st.sampled_from(["ok", "not_found", "permission_denied"]),
        st.one_of(st.sampled_from([0.0, *LATENCY_BUCKETS]), st.floats(0, 20, allow_nan=False)),
        st.one_of(st.none(), st.integers(0, 200_000)),
        st.integers(1, 5),
    ),
    max_size=40,
)


def _families(text: bytes, prefixes: tuple[str, ...]) -> list[str]:
    """The sample lines of the named families, without the ``_created`` timestamps."""
    return sorted(
        line
        for line in text.decode().splitlines()
        if line.startswith(prefixes) and "_created" not in line
    )


@settings(max_examples=60, deadline=None)
@given(observations)
def test_exposition_matches_prometheus_client(seen: list[tuple[str, str, float, int | None, int]]) -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter("keybroker_requests", "x", ["method", "code"], registry=reference)
    latency = Histogram(
        "keybroker_request_seconds", "x", ["method"], buckets=LATENCY_BUCKETS, registry=reference
    )
    batch = Histogram("keybroker_batch_items", "x", ["method"], buckets=BATCH_BUCKETS, registry=reference)
    for method, code, seconds, items, count in seen:
        # count requests alike (a gathered group) are one call; the reference sees each.
        metrics.observe(method, code, seconds, items, count)
        for _ in range(count):
            requests.labels(method, code).inc()
            latency.labels(method).observe(seconds)
            if items is not None:
                batch.labels(method).observe(items)
    prefixes = ("keybroker_requests", "keybroker_request_seconds", "keybroker_batch_items")
    ours, theirs = generate_latest(metrics.registry), generate_latest(reference)
    assert _families(ours, prefixes) == _families(theirs, prefixes)
