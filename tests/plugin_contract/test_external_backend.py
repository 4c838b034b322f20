"""A third-party backend plugin, installed as its own distribution, is found and conforms.

The plugin lives in tests/plugin_contract/external_backend (distribution
``keybroker-demo-backend``, module ``keybroker_demo_backend``, protection
``demo-software``). tests/run.sh installs it into the venv; these tests fail
rather than skip when it is missing, because a skipped plugin contract proves
nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from keybroker_softkeys import FileRootKey

from broker.backend import Backend
from broker.config import Config
from broker.testing import BackendConformance

DISTRIBUTION = "keybroker-demo-backend"
MODULE = "keybroker_demo_backend"
ENTRY_POINT = "demo-software"
INSTALL_HINT = (
    f"the demo plugin {DISTRIBUTION!r} is not installed in this environment; "
    "run tests/run.sh, or: .venv/bin/pip install ./tests/plugin_contract/external_backend"
)


def demo_module() -> ModuleType:
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        pytest.fail(INSTALL_HINT)


def test_distribution_is_installed() -> None:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(INSTALL_HINT)
    assert dist.metadata["Name"] == DISTRIBUTION


def test_entry_point_is_discovered() -> None:
    found = [ep for ep in importlib.metadata.entry_points(group="keybroker") if ep.name == ENTRY_POINT]
    if not found:
        pytest.fail(INSTALL_HINT)
    [entry_point] = found
    assert entry_point.value == MODULE
    assert entry_point.dist is not None and entry_point.dist.name == DISTRIBUTION
    module = entry_point.load()
    assert module is demo_module()
    # The module is the installed copy, not the source folder next to this test.
    assert module.__file__ is not None
    assert Path(__file__).parent / "external_backend" not in Path(module.__file__).parents


def test_hook_offers_one_demo_backend(tmp_path: Path) -> None:
    module = demo_module()
    config = Config(data_dir=tmp_path, socket_path=tmp_path / "keybroker.sock")
    backends = module.kb_backends(config=config, root=FileRootKey(tmp_path / "root.key"))
    assert [b.protection for b in backends] == [ENTRY_POINT]


class TestDemoBackend(BackendConformance):
    """The third-party backend passes the same suite as the built-in one."""

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[Backend]:
        module = demo_module()
        root = FileRootKey(tmp_path / "data" / "root.key")
        await root.open()
        config = Config(data_dir=tmp_path / "data", socket_path=tmp_path / "data" / "keybroker.sock")
        [backend] = module.kb_backends(config=config, root=root)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()
            await root.aclose()
