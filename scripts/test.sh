#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests (the real app on
# port 0 with real WebSocket/HTTP clients, and the real binary for crash/memory tests).
#
# It installs what it needs when it is missing and allowed to (root, or CI=true), and says
# loudly what it skipped otherwise. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }
warn() { printf '\n!! %s\n' "$*" >&2; }

can_install() { [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; }

# Rust toolchain pieces.
if ! command -v cargo >/dev/null; then
    warn "cargo is not installed: install Rust (https://rustup.rs) and run this again"
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null && can_install; then
            rustup component add "$component"
        else
            warn "$component is missing and cannot be installed here"
            exit 1
        fi
    fi
done

# Debian packages the integration tests drive: coturn's client tools (a real TURN client).
SKIPPED=()
EXCLUDE=()   # nextest filter expressions of tests that cannot run here
apt_install() {
    if ! command -v apt-get >/dev/null || ! can_install; then
        return 1
    fi
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
if ! command -v turnutils_uclient >/dev/null; then
    say "installing coturn (for turnutils_uclient / turnutils_peer)"
    apt_install coturn || true
    # The package enables a turnserver service on some systems; the tests only need the tools.
    if command -v systemctl >/dev/null; then systemctl disable --now coturn >/dev/null 2>&1 || true; fi
fi
if ! command -v turnutils_uclient >/dev/null; then
    SKIPPED+=("coturn client tests (turnutils_uclient missing: apt-get install coturn)")
    EXCLUDE+=('test(/^coturn::/)')
fi

# systemd-analyze (unit verification) and openssl (test certificates for TLS reload).
for tool in systemd-analyze:systemd openssl:openssl; do
    bin=${tool%%:*}; pkg=${tool##*:}
    if ! command -v "$bin" >/dev/null; then
        say "installing $pkg (for $bin)"
        apt_install "$pkg" || true
    fi
done
if ! command -v systemd-analyze >/dev/null; then
    SKIPPED+=("unit file verification (systemd-analyze missing: apt-get install systemd)")
    EXCLUDE+=('test(=ops::the_unit_file_passes_systemd_analyze_verify)')
fi
if ! command -v openssl >/dev/null; then
    SKIPPED+=("TLS reload test (openssl missing: apt-get install openssl)")
    EXCLUDE+=('test(=ops::sighup_swaps_certificate_and_turn_secret_without_dropping_anything)')
fi

# Browser tests: Debian's Chromium and playwright-core from npm (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
    say "installing chromium (browser end-to-end tests)"
    apt_install chromium fonts-dejavu-core || true
fi
BROWSER_TESTS=1
if [ ! -x /usr/bin/chromium ]; then
    SKIPPED+=("browser end-to-end tests (chromium missing: apt-get install chromium)")
    BROWSER_TESTS=0
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "installing nodejs and npm (SDK and browser tests)"
    apt_install nodejs npm || true
fi
NODE_TESTS=1
if ! command -v node >/dev/null; then
    SKIPPED+=("SDK unit tests and browser tests (node missing: apt-get install nodejs npm)")
    NODE_TESTS=0
    BROWSER_TESTS=0
fi

# redis-server for the cluster broker's tests (each test starts its own on a free port).
if ! command -v redis-server >/dev/null; then
    say "installing redis-server"
    apt_install redis-server || true
    if command -v systemctl >/dev/null; then systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
fi
if ! command -v redis-server >/dev/null; then
    SKIPPED+=("Redis broker tests (redis-server missing: apt-get install redis-server)")
    EXCLUDE+=('test(/redis/)')
fi

# A throwaway PostgreSQL for the store conformance suite on the cluster backend (PROTOCOL §8).
pg_installed() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
if ! pg_installed; then
    say "installing postgresql"
    apt_install postgresql || true
    # The package starts a cluster service; the tests start their own.
    if command -v systemctl >/dev/null; then systemctl disable --now postgresql >/dev/null 2>&1 || true; fi
fi
if pg_installed && pg_env=$(scripts/pg-temp.sh); then
    eval "$pg_env"
    trap 'scripts/pg-temp.sh stop "$PG_TEMP_DIR"' EXIT
    say "PostgreSQL for the tests: $SB_TEST_POSTGRES_URL"
else
    SKIPPED+=("PostgreSQL store tests (postgresql missing or not startable: apt-get install postgresql)")
    EXCLUDE+=('test(/^postgres/)')
fi

say "cargo fmt --check"
cargo fmt --check

say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

say "tests"
if cargo nextest --version >/dev/null 2>&1; then
    # Retries would hide flakiness; none are configured.
    FILTER=()
    if [ ${#EXCLUDE[@]} -gt 0 ]; then
        FILTER=(-E "not ($(IFS='|'; echo "${EXCLUDE[*]}"))")
    fi
    cargo nextest run --no-fail-fast "${FILTER[@]}"
else
    warn "cargo-nextest not found: running the same tests with cargo test instead"
    if [ ${#SKIPPED[@]} -gt 0 ]; then
        warn "without cargo-nextest the skips above cannot be applied; those tests will fail"
    fi
    cargo test --no-fail-fast
fi

if [ "$NODE_TESTS" = 1 ]; then
    say "SDK unit tests, Socket.IO client tests and browser end-to-end tests (node --test)"
    (cd web/tests && npm ci --no-audit --no-fund --loglevel=error)
    cargo build --quiet   # the browser tests drive target/debug/switchboard
    files=(web/tests/sdk.test.mjs web/tests/socketio.test.mjs)
    if [ "$BROWSER_TESTS" = 1 ]; then
        files+=(web/tests/e2e.test.mjs web/tests/turn-transports.test.mjs web/tests/socketio-browser.test.mjs)
    fi
    node --test --test-timeout=180000 "${files[@]}"
fi

# The benchmarks plot with matplotlib (PyPI).
if command -v python3 >/dev/null && ! python3 -c 'import matplotlib' 2>/dev/null; then
    if can_install; then
        say "installing matplotlib (benchmark plots)"
        python3 -m pip install --quiet matplotlib || true
    fi
    if ! python3 -c 'import matplotlib' 2>/dev/null; then
        SKIPPED+=("benchmark plots in the smoke runs (matplotlib missing: pip install matplotlib)")
    fi
fi

# Benchmarks are not pass/fail, but each runs once in a tiny mode so it cannot rot.
if command -v turnserver >/dev/null && command -v python3 >/dev/null; then
    say "benchmark smoke run: scripts/bench/turn.sh --smoke"
    bash scripts/bench/turn.sh --smoke
else
    SKIPPED+=("TURN benchmark smoke run (turnserver or python3 missing)")
fi
if [ "$NODE_TESTS" = 1 ] && command -v python3 >/dev/null; then
    say "benchmark smoke run: scripts/bench/ws.sh --smoke (and its several-nodes part)"
    (cd benches/baselines/socketio && npm ci --no-audit --no-fund --loglevel=error)
    bash scripts/bench/ws.sh --smoke
else
    SKIPPED+=("WebSocket benchmark smoke run (node or python3 missing)")
fi
if ! command -v redis-server >/dev/null || ! pg_installed; then
    SKIPPED+=("several-nodes benchmark smoke run (redis-server or postgresql missing)")
fi

if [ ${#SKIPPED[@]} -gt 0 ]; then
    for s in "${SKIPPED[@]}"; do warn "SKIPPED (not counted as passed): $s"; done
    say "checks passed, with the skips above"
else
    say "all checks passed"
fi
