#!/usr/bin/env bash
# WebSocket benchmark, side by side with a Socket.IO 4 server (see ws.py), then the same
# workloads on several nodes: one node on SQLite, one on PostgreSQL, two on PostgreSQL + Redis
# (see cluster.py; skipped loudly when redis-server or PostgreSQL is missing).
#   scripts/bench/ws.sh [--smoke] [--rounds N] [--write-docs] [--profile] [--skip-socketio] [--skip-cluster]
set -euo pipefail
cd "$(dirname "$0")/../.."
ws_args=() cluster_args=() cluster=1
while [ $# -gt 0 ]; do
    case "$1" in
        --skip-cluster) cluster=0 ;;
        --smoke | --write-docs) ws_args+=("$1"); cluster_args+=("$1") ;;
        --rounds) ws_args+=("$1" "$2"); cluster_args+=("$1" "$2"); shift ;;
        *) ws_args+=("$1") ;;
    esac
    shift
done
python3 scripts/bench/ws.py "${ws_args[@]}"
if [ "$cluster" = 1 ]; then
    if command -v redis-server >/dev/null && command -v psql >/dev/null \
        && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        python3 scripts/bench/cluster.py "${cluster_args[@]}"
    else
        echo "!! SKIPPED the several-nodes part (redis-server or postgresql missing: apt-get install redis-server postgresql)" >&2
    fi
fi
