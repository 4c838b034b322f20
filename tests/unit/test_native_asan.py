"""Run the envelope and flush tests against an AddressSanitizer + UBSan build of broker._native.

The module is rebuilt with ``KEYBROKER_SANITIZE=1 native/build.py --tmpdir``
into a temporary directory next to a copy of the broker package, and pytest
runs test files in a subprocess with the gcc ASan runtime preloaded into the
(uninstrumented) interpreter, twice: the envelope and flush tests with
``PYTHONMALLOC=malloc``, so that ASan sees every buffer Python hands to C;
then the allocator and envelope tests with pymalloc, whose arenas go through
the sanitized module's arena cache as in ``keybroker serve``. Any sanitizer
report or a non-zero exit fails this test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = {
    # ASan sees every allocation, the buffers Python passes to C included.
    "malloc": [
        "tests/unit/test_envelope.py",
        "tests/unit/test_envelope_engine.py",
        "tests/property/test_envelope_props.py",
        "tests/unit/test_durable.py",
    ],
    # pymalloc's arenas (and threads' frame-stack chunks) go through the
    # arena cache as batches of small items come and go. (The allocator
    # tests count page faults and resident memory of glibc's malloc, which
    # ASan replaces; they do not run here.)
    "pymalloc": [
        "tests/unit/test_envelope.py",
        "tests/property/test_envelope_props.py",
    ],
}
BUILD_TIMEOUT = 240
RUN_TIMEOUT = 180

# Loaded with -p before collection, so ``broker`` binds to the copy next to the
# sanitized module whatever pytest later inserts into sys.path.
PLUGIN = '''\
import os
import broker._native
import broker.allocator
import broker.envelope

_expected = os.environ["KB_ASAN_DIR"]
if not os.path.realpath(broker._native.__file__).startswith(os.path.realpath(_expected)):
    raise RuntimeError("sanitized broker._native not imported: " + broker._native.__file__)
# Every arena the interpreter maps or unmaps from here on goes through the
# sanitized arena cache, as in `keybroker serve`.
if not broker.allocator.keep_freed_arenas():
    raise RuntimeError("the arena cache was not installed")
'''

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "runtime error:",
    "ERROR: LeakSanitizer",
    "SUMMARY: UndefinedBehavior",
)


def _libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the sanitized module beside a copy of the broker package."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc's libasan.so is not available")
    tmp_path = tmp_path_factory.mktemp("asan")
    env = dict(os.environ)
    env["KEYBROKER_SANITIZE"] = "1"
    build = subprocess.run(
        [sys.executable, str(ROOT / "native" / "build.py"), "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=BUILD_TIMEOUT, check=False,
    )
    assert build.returncode == 0, f"sanitized build failed:\n{build.stdout}\n{build.stderr}"
    built = list((tmp_path / "broker").glob("_native*.so"))
    assert len(built) == 1, built

    # A copy of the broker package beside the sanitized module.
    for src in (ROOT / "broker").rglob("*.py"):
        dest = tmp_path / "broker" / src.relative_to(ROOT / "broker")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    (tmp_path / "kb_asan_plugin.py").write_text(PLUGIN)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("allocator", sorted(RUNS))
def test_native_tests_pass_under_asan_and_ubsan(sanitized: Path, allocator: str) -> None:
    libasan = _libasan()
    assert libasan is not None
    tmp_path = sanitized
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASAN_", "UBSAN_", "LD_PRELOAD"))}
    env.update(
        {
            "LD_PRELOAD": libasan,
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
            "PYTHONPATH": str(tmp_path),
            "KB_ASAN_DIR": str(tmp_path),
            "KB_ENVELOPE_EXAMPLES": "12",
            "PYTHONMALLOC": allocator,
        }
    )
    env.pop("KEYBROKER_SANITIZE", None)
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-x", "--noconftest", "-p", "no:cacheprovider",
            "-p", "kb_asan_plugin", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
            *(str(ROOT / f) for f in RUNS[allocator]),
        ],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=RUN_TIMEOUT, check=False,
    )
    output = proc.stdout + proc.stderr
    reports = [m for m in SANITIZER_MARKERS if m in output]
    assert not reports, f"sanitizer reported {reports}:\n{output[-20000:]}"
    tail = output[-20000:]
    assert proc.returncode == 0, f"envelope tests failed under sanitizers (exit {proc.returncode}):\n{tail}"
    assert " passed" in output
    if os.environ.get("KB_ASAN_VERBOSE"):
        print(output)


# -- the build script's error messages ----------------------------------------


def _load_build_module() -> Any:
    spec = importlib.util.spec_from_file_location("kb_native_build", ROOT / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_reports_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    build = _load_build_module()
    monkeypatch.setenv("CC", "/nonexistent/kb-cc")
    with pytest.raises(build.NativeBuildError, match=r"C compiler .* not found"):
        build.check_toolchain()


def test_build_reports_missing_openssl_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    build = _load_build_module()
    monkeypatch.setenv("CC", "gcc")
    probe = "#include <openssl/kb_no_such_header.h>\nint main(void){return 0;}\n"
    monkeypatch.setattr(build, "_PROBE", probe)
    with pytest.raises(build.NativeBuildError, match="libssl-dev"):
        build.check_toolchain()
