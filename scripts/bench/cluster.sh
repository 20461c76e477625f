#!/usr/bin/env bash
# Several nodes: one node on SQLite, one on PostgreSQL, two on PostgreSQL + Redis: see cluster.py.
#   scripts/bench/cluster.sh [--smoke] [--rounds N] [--write-docs]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/bench/cluster.py "$@"
