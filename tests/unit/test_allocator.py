"""broker.allocator: a batch's freed memory is reused, not page-faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# The tuning is process-wide: each test runs its own child, so none of it
# leaks into the test run.
CHILD = textwrap.dedent(
    """
    import os, resource, sys
    from broker.allocator import keep_freed_memory
    from broker.envelope import KeySlot

    count, size = int(sys.argv[1]), int(sys.argv[2])
    slot = KeySlot(os.urandom(32), os.urandom(16), 1)
    items = [os.urandom(size) for _ in range(count)]

    def faults_per_batch():
        slot.seal_batch(items)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            slot.seal_batch(items)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    untuned = faults_per_batch()
    # Twice: a second call must not wrap the arena cache around itself.
    if not (keep_freed_memory() and keep_freed_memory()):
        sys.exit(3)
    if len(sys.argv) > 3:
        # A thread that ends first hands its frame-stack chunk (16 KiB) to
        # the arena allocator before any arena: the cache must not settle on it.
        import threading
        worker = threading.Thread(target=lambda: None)
        worker.start()
        worker.join()
    print(untuned, faults_per_batch())
    """
)


def run_child(code: str, *args: object) -> str:
    argv = [sys.executable, "-c", code, *map(str, args)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
@pytest.mark.parametrize(
    ("count", "size"),
    [
        # 1,000 x 4 KiB in and out is ~2,000 pages of malloc'd buffers:
        # glibc's defaults fault them in anew each batch.
        (1_000, 4096),
        # 100,000 x 32 B: the envelopes are small objects in CPython's own
        # arenas (~10 of them), unmapped and mapped again each batch.
        (100_000, 32),
    ],
)
@pytest.mark.parametrize("thread_first", [False, True], ids=["", "thread-first"])
def test_a_batchs_memory_is_reused_after_tuning(count: int, size: int, thread_first: bool) -> None:
    extra = ["thread-first"] if thread_first else []
    untuned, tuned = map(float, run_child(CHILD, count, size, *extra).split())
    assert untuned > 500, untuned
    assert tuned < untuned / 10, (untuned, tuned)


BOUNDED = textwrap.dedent(
    """
    from broker.allocator import KEPT_ARENA_BYTES, TRIM_THRESHOLD, keep_freed_memory

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    assert keep_freed_memory()
    before = resident()
    objects = [bytes(100) + i.to_bytes(8, "little") for i in range(2_000_000)]
    held = resident() - before
    del objects
    print(held, resident() - before, KEPT_ARENA_BYTES + TRIM_THRESHOLD)
    """
)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/statm")
def test_arenas_beyond_the_budget_go_back_to_the_system() -> None:
    held, kept, budget = map(int, run_child(BOUNDED).split())
    # ~2 M small objects fill ~280 MB of arenas (and a 16 MB list on the
    # heap); once they are freed, at most the kept arenas and the heap's
    # trim threshold stay with the process.
    assert held > 2 * budget, (held, budget)
    assert kept < budget, (kept, budget)
