#!/usr/bin/env bash
# The whole test suite from a clean checkout: installs what the tests need
# (system packages where this machine allows, a venv with keybroker and its
# native module, the test-only plugin package), then runs ruff and pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# CI must fail, not skip, when SoftHSM2 or PostgreSQL is missing.
if [ "${CI:-}" = "true" ]; then export KEYBROKER_REQUIRE_ALL=1; fi

missing=()
command -v gcc >/dev/null || missing+=(gcc)
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v chromium >/dev/null || missing+=(chromium)
command -v rsyslogd >/dev/null || [ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo -n apt-get); fi
  echo "installing system packages: ${missing[*]}"
  if ! { "${apt_get[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/keybroker-apt.log 2>&1; then
    echo "warning: could not install ${missing[*]} (see /tmp/keybroker-apt.log); tests that need them will skip (or fail with KEYBROKER_REQUIRE_ALL=1)"
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,hsm,postgres]'
.venv/bin/pip install -q --disable-pip-version-check ./tests/plugin_contract/external_backend

# The Node.js interoperability test's MessagePack-RPC client (tests/interop/package.json).
if command -v npm >/dev/null; then
  npm install --prefix tests/interop --no-audit --no-fund --silent || echo "warning: npm install in tests/interop failed; the Node.js interop test will skip (or fail with KEYBROKER_REQUIRE_ALL=1)"
fi
.venv/bin/ruff check --quiet .
exec .venv/bin/pytest "$@"
