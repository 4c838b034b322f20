"""Coverage-guided fuzzing of the network-facing parsers, bounded in time.

Each target runs under atheris (libFuzzer) for KEYBROKER_FUZZ_SECONDS
(default 6) in a subprocess; a crash, an unexpected exception or a failed
assertion in the target makes libFuzzer exit non-zero and save the input.
Long runs: ``python tests/fuzz/fuzz_targets.py decoder -max_total_time=3600``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_targets.py")
SECONDS = int(os.environ.get("KEYBROKER_FUZZ_SECONDS", "6"))


@pytest.mark.parametrize("target", ["decoder", "header", "params"])
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), target, f"-max_total_time={SECONDS}", "-rss_limit_mb=1536",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=SECONDS + 120, check=False,
    )
    tail = result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert "Done" in result.stderr and not list(tmp_path.glob("crash-*")), tail
    runs = int(next(line for line in result.stderr.splitlines() if "stat::number_of_executed_units" in line)
               .split(":")[-1])
    assert runs > 1000, tail
