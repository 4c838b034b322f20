"""cffi build script for ``broker._native`` (API mode, out-of-line).

Used by ``setup.py`` (``cffi_modules=["native/build.py:ffibuilder"]``) and
runnable directly to build the module in place::

    python native/build.py                 # writes broker/_native*.so
    python native/build.py --tmpdir DIR    # writes DIR/broker/_native*.so

``KEYBROKER_SANITIZE=1`` builds with ``-fsanitize=address,undefined`` (used by
tests/unit/test_native_asan.py). The module links the system OpenSSL libcrypto
(3.0 or newer).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_PROBE = """\
#include <openssl/opensslv.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "keybroker needs OpenSSL 3.0 or newer"
#endif
int main(void) { return 0; }
"""


class NativeBuildError(RuntimeError):
    """The environment cannot build the native module; the message says why."""


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    argv = shlex.split(cc)
    if not argv or shutil.which(argv[0]) is None:
        raise NativeBuildError(
            f"keybroker native build: C compiler {argv[0] if argv else cc!r} not found. "
            "Install one (Debian/Ubuntu: apt-get install gcc) or set CC."
        )
    return argv


def check_toolchain() -> None:
    """Raise :class:`NativeBuildError` with a readable message if the compiler,
    the OpenSSL 3 headers or libcrypto are missing."""
    argv = _compiler()
    with tempfile.TemporaryDirectory(prefix="kb-probe-") as tmp:
        src = Path(tmp, "probe.c")
        src.write_text(_PROBE)
        cflags = shlex.split(os.environ.get("CFLAGS", ""))
        ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
        proc = subprocess.run(
            [*argv, *cflags, str(src), "-o", str(Path(tmp, "probe")), *ldflags, "-lcrypto"],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode == 0:
        return
    err = proc.stderr
    if re.search(r"openssl/\w+\.h", err) and ("No such file" in err or "not found" in err):
        hint = "OpenSSL development headers not found (Debian/Ubuntu: apt-get install libssl-dev)."
    elif "OpenSSL 3.0" in err:
        hint = "the installed OpenSSL is older than 3.0; keybroker needs OpenSSL 3.0 or newer."
    elif "-lcrypto" in err or "cannot find" in err:
        hint = "libcrypto not found by the linker (Debian/Ubuntu: apt-get install libssl-dev)."
    else:
        hint = "the OpenSSL probe program failed to compile."
    raise NativeBuildError(f"keybroker native build: {hint}\ncompiler output:\n{err.strip()}")


def _cdef() -> str:
    """kb.h without preprocessor lines: it is written to double as the cdef."""
    lines = (HERE / "kb.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _sanitize() -> bool:
    return os.environ.get("KEYBROKER_SANITIZE", "") not in ("", "0")


def _src(path: Path, absolute: bool) -> str:
    """setuptools wants paths relative to setup.py; cffi's compile() chdirs, so it wants absolute ones."""
    if not absolute and Path.cwd().resolve() == ROOT:
        return str(path.relative_to(ROOT))
    return str(path)


def make_ffibuilder(absolute: bool = False) -> FFI:
    check_toolchain()
    compile_args = ["-std=gnu11", "-Wall", "-Wextra", "-Wconversion", "-fvisibility=hidden"]
    link_args: list[str] = []
    if _sanitize():
        san = "-fsanitize=address,undefined"
        compile_args += [san, "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
        link_args += [san]
    else:
        compile_args += ["-O2"]
    builder = FFI()
    builder.cdef(_cdef())
    builder.set_source(
        "broker._native",
        '#include "kb.h"',
        sources=[_src(HERE / "kb.c", absolute)],
        include_dirs=[_src(HERE, absolute)],
        libraries=["crypto"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # One file name whichever way it is built (pip or this script), so a
        # stale build of the other kind can never shadow a fresh one.
        py_limited_api=False,
    )
    return builder


ffibuilder = make_ffibuilder()


def main() -> None:
    parser = argparse.ArgumentParser(description="Build broker._native in place (or into --tmpdir).")
    parser.add_argument("--tmpdir", default=str(ROOT), help="output root; the module lands in TMPDIR/broker/")
    args = parser.parse_args()
    dest = Path(args.tmpdir).resolve() / "broker"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kb-build-") as work:
        built = Path(make_ffibuilder(absolute=True).compile(tmpdir=work, verbose=False))
        target = dest / built.name
        for stale in dest.glob("_native.*.so"):
            stale.unlink()
        shutil.copy2(built, target)
    print(target)


if __name__ == "__main__":
    main()
