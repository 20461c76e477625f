#!/usr/bin/env bash
# WebSocket benchmark, side by side with a Socket.IO 4 server: see ws.py.
#   scripts/bench/ws.sh [--smoke] [--rounds N] [--write-docs]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/bench/ws.py "$@"
