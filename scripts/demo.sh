#!/usr/bin/env bash
# The demo, from a fresh machine: virtualenv, then `edge-agent demo` (arguments go to it: --duration 60, --no-color ...).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$REPO"

ensure_venv cloud
ensure_mosquitto || say "Mosquitto is missing: the demo uses its embedded broker"
exec "$VENV/bin/edge-agent" demo "$@"
