#!/usr/bin/env bash
# Installs Switchboard as a systemd service. Idempotent: run it again to upgrade the binary and
# the unit; an existing config and existing secrets are never overwritten.
#
#   scripts/install.sh [--binary PATH] [--prefix /usr/local] [--destdir DIR] [--no-enable]
#   scripts/install.sh --uninstall [--purge] [--prefix ...] [--destdir ...]
#
# Without --binary it uses target/release/switchboard, building it first if needed.
# --destdir (or DESTDIR=) installs into a staging root and never touches systemctl.
# What it lays down:
#   $PREFIX/bin/switchboard
#   the system user and group `switchboard`    (on a live system, if missing)
#   /etc/switchboard/switchboard.toml          (from turn-config/switchboard.toml, if missing;
#                                               0640 root:switchboard)
#   /etc/switchboard/credentials/{jwt_secret,turn_secret}   (0600, generated, if missing)
#   /etc/systemd/system/switchboard.service    (ExecStart adjusted to $PREFIX)
#   $PREFIX/share/doc/switchboard/             (operations.md, protocol.md, nginx.conf)
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/local
DESTDIR="${DESTDIR:-}"
BINARY=""
ENABLE=1
UNINSTALL=0
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY="$2"; shift 2 ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --destdir) DESTDIR="$2"; shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

BIN="$DESTDIR$PREFIX/bin/switchboard"
ETC="$DESTDIR/etc/switchboard"
UNIT="$DESTDIR/etc/systemd/system/switchboard.service"
DOC="$DESTDIR$PREFIX/share/doc/switchboard"
live_system() { [ -z "$DESTDIR" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" = 1 ]; then
    if live_system; then
        systemctl disable --now switchboard.service 2>/dev/null || true
    fi
    rm -f "$BIN" "$UNIT"
    rm -rf "$DOC"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$ETC"
        echo "removed the config and credentials in $ETC (the data in /var/lib/switchboard stays)"
    else
        echo "kept $ETC (use --purge to remove it)"
    fi
    if live_system; then systemctl daemon-reload; fi
    echo "switchboard uninstalled"
    exit 0
fi

if [ -z "$BINARY" ]; then
    BINARY=target/release/switchboard
    if [ ! -x "$BINARY" ]; then
        echo "building the release binary (cargo build --release)"
        cargo build --release --locked
    fi
fi
[ -x "$BINARY" ] || { echo "install.sh: $BINARY is not an executable" >&2; exit 1; }

# The service runs as `switchboard` (the unit's User=, with DynamicUser's sandbox); the config
# may hold secrets, so it is readable by root and that group only.
# `getent -s files`: a running DynamicUser service makes nss-systemd report a transient
# `switchboard` user; only a static one (in /etc/passwd) keeps its ids across restarts.
if [ -z "$DESTDIR" ]; then
    if ! getent -s files group switchboard >/dev/null; then
        groupadd --system switchboard
        echo "created the system group switchboard"
    fi
    if ! getent -s files passwd switchboard >/dev/null; then
        useradd --system --gid switchboard --no-create-home --home-dir /var/lib/switchboard \
            --shell /usr/sbin/nologin switchboard
        echo "created the system user switchboard"
    fi
fi

install -d -m 0755 "$DESTDIR$PREFIX/bin" "$ETC" "$DESTDIR/etc/systemd/system" "$DOC"
# Replace the binary atomically, so a running server keeps its old inode.
install -m 0755 "$BINARY" "$BIN.new"
mv -f "$BIN.new" "$BIN"

if [ ! -e "$ETC/switchboard.toml" ]; then
    install -m 0640 turn-config/switchboard.toml "$ETC/switchboard.toml"
    echo "wrote $ETC/switchboard.toml (edit it, then: systemctl reload switchboard)"
else
    echo "kept the existing $ETC/switchboard.toml"
    # Tighten what older versions installed world-readable; leave stricter modes alone.
    chmod o-rwx "$ETC/switchboard.toml"
fi
if getent -s files group switchboard >/dev/null; then
    chgrp switchboard "$ETC/switchboard.toml"
else
    echo "note: no group switchboard on this machine; on the target run: chgrp switchboard /etc/switchboard/switchboard.toml"
fi
install -d -m 0700 "$ETC/credentials"
for name in jwt_secret turn_secret; do
    if [ ! -s "$ETC/credentials/$name" ]; then
        (umask 077; head -c 32 /dev/urandom | base64 | tr -d '=\n' > "$ETC/credentials/$name")
        echo "generated $ETC/credentials/$name"
    fi
done

sed "s#/usr/local/bin/switchboard#$PREFIX/bin/switchboard#g" systemd/switchboard.service > "$UNIT.new"
chmod 0644 "$UNIT.new"
mv -f "$UNIT.new" "$UNIT"
install -m 0644 docs/operations.md docs/protocol.md turn-config/nginx.conf "$DOC/"

"$BIN" check-config --config "$ETC/switchboard.toml" >/dev/null

if [ "$ENABLE" = 1 ] && live_system; then
    systemctl daemon-reload
    systemctl enable switchboard.service
    if systemctl is-active --quiet switchboard.service; then
        systemctl restart switchboard.service
    else
        systemctl start switchboard.service
    fi
    echo "switchboard is running: systemctl status switchboard"
else
    echo "installed into ${DESTDIR:-/} (service not started)"
fi
