#!/usr/bin/env bash
# The whole test suite: installs what the tests need (SoftHSM, a running
# PostgreSQL at 127.0.0.1:5432, Debian's chromium and a pinned
# playwright-core), runs every test of the workspace on SQLite and
# PostgreSQL in both crypto modes, then the hosted pages' end-to-end tests
# in headless Chromium against the debug binary.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hsm/install-softhsm.sh

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
pg_up() { command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; }
if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing postgresql ..." >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  fi
  for v in $(ls /etc/postgresql); do
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
fi
# The tests connect as postgres without a password (trust on 127.0.0.1) and
# create one database per test; the admin database is `test`.
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -c 'create database test' >/dev/null
fi

cargo test --workspace --all-targets

# The hosted capture and CVV pages in a real browser. Debian's chromium is
# driven by playwright-core, pinned in tests/browser/package-lock.json; no
# browser is downloaded. Screenshots land in target/screenshots/.
if ! command -v chromium >/dev/null; then
  echo "installing chromium ..." >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs ..." >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "the browser tests need Node.js 20 or newer (found $(node --version))" >&2
  exit 1
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
cargo build --bin cardvault
CHROMIUM_PATH="$(command -v chromium)" node --test --test-concurrency=1 tests/browser/hosted.test.mjs
