#!/usr/bin/env bash
# The broker-facing tests against the LOWEST paho-mqtt release pyproject.toml allows; the project's own
# virtualenv (scripts/test.sh) resolves the highest. Together they are the range the pin promises.
#
#   scripts/test-paho.sh [PYTEST ARGS...]          e.g. scripts/test-paho.sh -x -k outbox
#
# paho-mqtt EDGE_AGENT_PAHO_RELEASE (default 2.1.0, the floor of pyproject's pin) is installed on its own
# into .venv-paho-low/ and put ahead of the project's virtualenv on PYTHONPATH, so this run (and every
# agent it starts) imports that release and everything else from .venv. EDGE_AGENT_EXPECT_PAHO makes
# tests/test_mqtt.py check that this run really has that release and that agent/transport/pahopatch.py
# is active on it (not fallen back to stock paho). When the pin's floor moves, change the default here.
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$REPO"
PAHO_LOW="${EDGE_AGENT_PAHO_RELEASE:-2.1.0}"
LOW="$REPO/.venv-paho-low"

ensure_venv dev,cloud
if [ "$(PYTHONPATH="$LOW" "$VENV/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)' 2>/dev/null)" != "$PAHO_LOW" ]; then
  say "installing paho-mqtt $PAHO_LOW into $LOW"
  rm -rf "$LOW"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$LOW" "paho-mqtt==$PAHO_LOW"
fi
ensure_mosquitto || say "Mosquitto is missing: broker tests will fail"

say "broker-facing tests on paho-mqtt $PAHO_LOW"
PYTHONPATH="$LOW${PYTHONPATH:+:$PYTHONPATH}" EDGE_AGENT_EXPECT_PAHO="$PAHO_LOW" "$VENV/bin/python" -m pytest -p no:cacheprovider -q \
  -n "${EDGE_AGENT_TEST_WORKERS:-3}" \
  tests/test_mqtt.py tests/test_mqtt_acl.py tests/test_mqtt_tls.py tests/test_outbox.py \
  tests/test_commands.py tests/test_sources.py tests/test_cli_fleet.py tests/test_e2e_daemon.py "$@"
