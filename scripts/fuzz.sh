#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60) with cargo-fuzz on
# nightly, libFuzzer with AddressSanitizer; what finds new coverage joins fuzz/corpus/<target>/
# (commit it: `cargo test --test fuzz_corpus` replays it on stable). A crash, a hang (> 5 s on one
# input) or more than 2 GiB of memory stops the run with the input in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS] [--write-docs]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=60
write_docs=0
for a in "$@"; do
    case "$a" in
        --write-docs) write_docs=1 ;;
        *) secs=$a ;;
    esac
done
if ! rustup toolchain list | grep -q nightly; then
    echo "!! nightly is missing: rustup toolchain install nightly" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=(turn_engine turn_stream ws_frame socketio_event jwt config)
rows=()
status=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    echo "== $t (${secs} s)"
    if cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -timeout=5 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        result="0"
    else
        result="FOUND (see fuzz/artifacts/$t/)"
        status=1
        tail -40 "$log"
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
    peak=$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    line="| \`$t\` | $(printf "%'d" "$runs") | $secs | $(( runs / secs )) | $corpus | $peak | $result |"
    echo "$line"
    rows+=("$line")
    rm -f "$log"
done
table="| target | executions | seconds | per second | corpus files | peak RSS (MB) | crashes, hangs, OOM |
|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do table+=$'\n'"$r"; done
echo
echo "$table"
if [ "$write_docs" = 1 ]; then
    python3 - "$table" "$secs" <<'PY'
import sys
sys.path.insert(0, "scripts/bench")
import report
table, secs = sys.argv[1], sys.argv[2]
body = (f"Machine: {report.machine()}. Command: `scripts/fuzz.sh {secs} --write-docs` "
        "(cargo-fuzz, libFuzzer with AddressSanitizer, nightly), starting from the committed corpus.\n\n" + table)
report.write_section("fuzz", "Fuzzing", body, doc=report.ROOT / "docs" / "robustness.md")
PY
fi
exit $status
