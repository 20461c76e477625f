#!/usr/bin/env bash
# TURN benchmark, side by side with coturn: see turn.py for what it measures.
#   scripts/bench/turn.sh [--smoke] [--rounds N] [--write-docs]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/bench/turn.py "$@"
