"""broker.allocator: a batch's freed buffers are reused, not page-faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import os, resource, sys
    from broker.allocator import keep_freed_memory
    from broker.envelope import KeySlot

    slot = KeySlot(os.urandom(32), os.urandom(16), 1)
    items = [os.urandom(4096) for _ in range(1000)]

    def faults_per_batch():
        slot.seal_batch(items)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            slot.seal_batch(items)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    untuned = faults_per_batch()
    if not keep_freed_memory():
        sys.exit(3)
    print(untuned, faults_per_batch())
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_a_batchs_buffers_are_reused_after_tuning() -> None:
    # In a child: the thresholds are process-wide and must not leak into the test run.
    run = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    untuned, tuned = map(float, run.stdout.split())
    # 1,000 x 4 KiB in and out is ~2,000 pages: glibc's defaults fault them in anew each batch.
    assert untuned > 500, untuned
    assert tuned < untuned / 10, (untuned, tuned)
