"""``keybroker serve`` refusing to start: one line on stderr, exit 1, no traceback.

Plugin sections are checked while the broker opens, inside trio's nurseries,
so their errors reach ``serve`` wrapped in exception groups; they must read
like the top-level configuration errors ``load_config`` raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._broker_process import broker_process

EXIT_FAILURE = 1
# A pin_env variable nothing sets.
UNSET_PIN_ENV = "KEYBROKER_TEST_UNSET_PIN"


def serve(
    data_dir: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``keybroker serve`` on ``data_dir``; it is expected to stop by itself."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    environ.pop(UNSET_PIN_ENV, None)
    environ.update(env or {})
    command = [sys.executable, "-m", "broker", "serve", "--data-dir", str(data_dir), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=60, check=False)


def refused(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == line + "\n"
    assert (result.returncode, result.stdout) == (EXIT_FAILURE, "")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[plugins.sqlite]\nbogus = 1\n", "config: unknown option(s) in [plugins.sqlite]: bogus"),
        (
            "[plugins.governance.critical]\nbogus = 1\n",
            "config: unknown option(s) in [plugins.governance.critical]: bogus",
        ),
        ("[plugins.software]\nbogus = 1\n", "config: unknown option(s) in [plugins.software]: bogus"),
        ("[plugins.syslog]\nbogus = 1\n", "config: unknown option(s) in [plugins.syslog]: bogus"),
        (
            f'[plugins.pkcs11]\nmodule = "/nonexistent/libpkcs11.so"\ntoken_label = "t"\n'
            f'pin_env = "{UNSET_PIN_ENV}"\n',
            f"config: [plugins.pkcs11] pin_env names {UNSET_PIN_ENV}, which is unset or empty",
        ),
        (
            "[plugins.certificates]\nbogus = 1\n",
            "config: unknown option(s) in [plugins.certificates]: bogus",
        ),
        ('root = "nonexistent"\n', "no plugin provides the root of trust 'nonexistent'"),
    ],
    ids=["sqlite", "governance", "software", "syslog", "pkcs11-pin", "certificates", "root"],
)
def test_config_error_in_a_plugin_section_is_one_line(short_tmp: Path, section: str, message: str) -> None:
    config = short_tmp / "keybroker.toml"
    config.write_text(section)
    result = serve(short_tmp / "data", "--config", config)
    refused(result, f"keybroker: invalid_argument: {message}")
    assert not (short_tmp / "data" / "keybroker.sock").exists()


def test_top_level_config_error_reads_the_same(short_tmp: Path) -> None:
    config = short_tmp / "keybroker.toml"
    config.write_text("bogus = 1\n")
    result = serve(short_tmp / "data", "--config", config)
    refused(result, "keybroker: invalid_argument: config: unknown option(s) in the top level: bogus")


def test_empty_passphrase_is_one_line(short_tmp: Path) -> None:
    result = serve(short_tmp / "data", env={"KEYBROKER_PASSPHRASE": ""})
    refused(result, "keybroker: invalid_argument: KEYBROKER_PASSPHRASE is set but empty")


def test_second_broker_on_a_served_data_dir_or_socket_is_one_line(short_tmp: Path) -> None:
    with broker_process(short_tmp) as first:
        audit_log = first.data_dir / "audit" / "audit.jsonl"
        same_dir = serve(first.data_dir, "--socket", short_tmp / "other.sock")
        in_use = f"audit log is in use by another keybroker process: {audit_log}"
        refused(same_dir, f"keybroker: unavailable: {in_use}")
        same_socket = serve(short_tmp / "other", "--socket", first.socket_path)
        refused(same_socket, f"keybroker: unavailable: another broker is listening: {first.socket_path}")
        assert first.alive()


BUG_AT_STARTUP = """
import sys

import broker.app


def broken(*args, **kwargs):
    raise RuntimeError("a bug at start-up")


broker.app.KeyService = broken
from broker.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_at_startup_keeps_its_traceback(short_tmp: Path) -> None:
    command = [sys.executable, "-c", BUG_AT_STARTUP, "serve", "--data-dir", str(short_tmp / "data")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_FAILURE
    assert "Traceback" in result.stderr
    assert "RuntimeError: a bug at start-up" in result.stderr
    assert "keybroker: " not in result.stderr
