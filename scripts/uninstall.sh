#!/usr/bin/env bash
# Remove what scripts/install.sh installed: stop and disable the service, remove the unit and the
# virtualenv. The profile (/etc/edge-agent) and the state (/var/lib/edge-agent: models, the outbox
# of unsent results) stay unless --purge, which also removes the cache and the edge-agent user.
# Idempotent: running it again, or after a partial install, is fine. See docs/systemd.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/uninstall.sh [options]

  --prefix DIR   where install.sh put the virtualenv (default: /opt/edge-agent)
  --root DIR     remove from the tree under DIR instead of /: files only; user and systemctl
                 commands are printed as "would run: ..." instead
  --purge        also remove /etc/edge-agent, /var/lib/edge-agent, /var/cache/edge-agent,
                 the unit's drop-ins and the edge-agent user
  -h, --help     this text
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'uninstall.sh: %s\n' "$*" >&2; exit "${2:-1}"; }

ROOT=/
PREFIX=/opt/edge-agent
PURGE=0
SERVICE=edge-agent.service
USER_NAME=edge-agent

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" 2 ;;
  esac
done

case "$PREFIX" in /?*) PREFIX="${PREFIX%/}" ;; *) die "--prefix must be an absolute path, got '$PREFIX'" 2 ;; esac
if [ "$ROOT" = / ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or with --root DIR)"
else
  [ -d "$ROOT" ] || die "--root: $ROOT is not a directory" 2
  ROOT="$(cd "$ROOT" && pwd)"
fi

dest() { if [ "$ROOT" = / ]; then printf '%s' "$1"; else printf '%s%s' "$ROOT" "$1"; fi; }
system() {  # printed, not run, under --root (shell-quoted; $WHEN as a comment when conditional)
  if [ "$ROOT" = / ]; then "$@"; return; fi
  printf 'would run:'; printf ' %q' "$@"; printf '%s\n' "${WHEN:+  # $WHEN}"
}
systemd_here() { [ "$ROOT" != / ] || [ -d /run/systemd/system ]; }

remove() {  # remove PATH...: what exists goes, what does not is fine
  local path
  for path in "$@"; do
    if [ -e "$(dest "$path")" ] || [ -L "$(dest "$path")" ]; then
      rm -rf -- "$(dest "$path")"
      say "removed $path"
    fi
  done
}

unit="$(dest /etc/systemd/system/$SERVICE)"
if systemd_here && { [ -e "$unit" ] || [ "$ROOT" != / ]; }; then
  # disable --now stops it too: SIGTERM, so the agent flushes its outbox and publishes offline.
  system systemctl disable --now "$SERVICE"
fi
remove /etc/systemd/system/$SERVICE /etc/systemd/system/$SERVICE.d/restart-backoff.conf
# The drop-in folder goes with --purge, or when install.sh's was the only drop-in in it.
if [ "$PURGE" = 1 ]; then
  remove /etc/systemd/system/$SERVICE.d
else
  rmdir "$(dest /etc/systemd/system/$SERVICE.d)" 2>/dev/null || true
fi
if systemd_here; then
  system systemctl daemon-reload
  if [ "$ROOT" = / ]; then systemctl reset-failed "$SERVICE" 2>/dev/null || true; fi
fi

# Only a folder install.sh made is removed whole: it leaves .installed beside the virtualenv.
if [ -e "$(dest "$PREFIX/.installed")" ] || [ -e "$(dest "$PREFIX/venv/pyvenv.cfg")" ]; then
  remove "$PREFIX"
elif [ -e "$(dest "$PREFIX")" ]; then
  say "left $PREFIX alone: install.sh did not make it (no $PREFIX/.installed)"
fi

if [ "$PURGE" = 1 ]; then
  remove /etc/edge-agent /var/lib/edge-agent /var/cache/edge-agent
  if [ "$ROOT" != / ]; then
    WHEN="if the user exists" system userdel "$USER_NAME"
  elif id "$USER_NAME" >/dev/null 2>&1; then
    userdel "$USER_NAME"
    say "removed the user $USER_NAME"
  fi
else
  kept=""
  for path in /etc/edge-agent /var/lib/edge-agent; do
    [ ! -e "$(dest "$path")" ] || kept="$kept $path"
  done
  [ -z "$kept" ] || say "kept$kept (the profile, models and unsent results); --purge removes them"
fi
say "edge-agent is uninstalled"
