"""The native module is clean under valgrind memcheck: no invalid read or
write, no use of uninitialised memory, in any stack that passes through it.

CPython itself reports a few uninitialised-value warnings under memcheck
(random bytes from getrandom, interpreter shutdown), and cffi's module
initialisation keeps its module objects for the life of the process; none
of that runs our code, so only errors and leaks whose stack passes through
``kb.c`` count. Leaks are checked in full: every slot, context and buffer
the native code allocates must be freed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import require

SCRIPT = Path(__file__).with_name("_valgrind_envelope.py")
REPO = Path(__file__).resolve().parents[2]


def test_envelope_under_memcheck(tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    require(valgrind is not None, "valgrind")
    assert valgrind is not None
    xml = tmp_path / "memcheck.xml"
    result = subprocess.run(
        [valgrind, "--tool=memcheck", "--xml=yes", f"--xml-file={xml}", "--leak-check=full",
         sys.executable, str(SCRIPT)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONMALLOC": "malloc", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    ours = []
    for error in ET.parse(xml).getroot().iter("error"):
        frames = [(f.findtext("obj") or "", f.findtext("fn") or "") for f in error.iter("frame")]
        if any(_is_ours(obj, fn) for obj, fn in frames):
            ours.append((error.findtext("kind"), [fn for _, fn in frames[:8]]))
    assert ours == [], ours


def _is_ours(obj: str, fn: str) -> bool:
    """A frame of kb.c's code (not cffi's generated glue in the same object)."""
    return "_native" in obj and not fn.startswith(("_cffi", "PyInit", "_my_Py"))
