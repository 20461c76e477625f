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

say "cargo fmt --check"
cargo fmt --check

say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

say "tests"
if cargo nextest --version >/dev/null 2>&1; then
    # Retries would hide flakiness; none are configured.
    cargo nextest run --no-fail-fast
else
    warn "cargo-nextest not found: running the same tests with cargo test instead"
    cargo test --no-fail-fast
fi

say "all checks passed"
