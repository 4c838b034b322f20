"""broker.app: the data directory a broker starts in."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.app import open_broker, prepare_data_dir
from broker.config import parse_config
from broker.errors import Unavailable


def test_own_data_dir_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    prepare_data_dir(parse_config({}, data_dir=data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


async def test_data_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    # As if the broker ran as another user than the directory's owner (no chown needed).
    other = data.stat().st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: other)
    with pytest.raises(Unavailable, match=f"owned by uid {other - 1}, not by this broker's user"):
        async with open_broker(parse_config({}, data_dir=data), run_scheduler=False):
            pass
    # Refused before anything was made or changed in it.
    assert list(data.iterdir()) == []
    assert stat.S_IMODE(data.stat().st_mode) == 0o755
