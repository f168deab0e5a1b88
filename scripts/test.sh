#!/usr/bin/env bash
# The whole test suite, from a fresh machine: virtualenv, Mosquitto, sample models, pytest, then the
# device-side tests again on emulated aarch64.
# Extra arguments go to pytest (e.g. scripts/test.sh -k profile).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$REPO"

ensure_venv dev,cloud
ensure_mosquitto || say "Mosquitto is missing: broker tests will fail"
command -v espeak-ng >/dev/null || apt_install espeak-ng || say "espeak-ng is missing: the speech test will be skipped"
command -v chromium >/dev/null && command -v chromedriver >/dev/null \
  || apt_install chromium chromium-driver fonts-dejavu-core || say "chromium is missing: the status page browser test will be skipped"
# The broker compatibility suite (tests/test_brokers.py) starts private RabbitMQ and ejabberd nodes of its own.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
  || apt_install rabbitmq-server || say "rabbitmq-server is missing: the RabbitMQ broker tests will be skipped"
compgen -G "/usr/lib/*/ejabberd-*/ebin" >/dev/null \
  || apt_install ejabberd || say "ejabberd is missing: the ejabberd broker tests will be skipped"
# The registry behind a real web server (tests/test_registry_nginx.py); only the binary is used, with a
# private configuration on a free port.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx || say "nginx is missing: the registry hosting tests will be skipped"

say "static checks: ruff (lint and format) and mypy"
"$VENV/bin/ruff" check agent tests bench scripts
"$VENV/bin/ruff" format --check agent tests bench scripts
"$VENV/bin/mypy"

# Most tests wait on real agents, brokers and servers rather than compute: three workers on two cores
# finish the suite in about half the time. EDGE_AGENT_TEST_WORKERS=0 runs it in this process.
WORKERS="${EDGE_AGENT_TEST_WORKERS:-3}"
say "running the test suite ($WORKERS workers)"
"$VENV/bin/python" -m pytest -n "$WORKERS" "$@"

# The paho-mqtt pin is a range: the run above had its highest release, this one its lowest (the private
# surface agent/transport/pahopatch.py relies on is checked on both). EDGE_AGENT_PAHO_LOW=0 skips it.
if [ "${EDGE_AGENT_PAHO_LOW:-}" != 0 ]; then
  "$REPO/scripts/test-paho.sh" "$@"
fi

# Most devices are 64-bit ARM: the device-side tests (marked arm64) run again on an emulated aarch64
# Python (on an aarch64 machine the run above already was native). EDGE_AGENT_ARM64=0 skips this part.
if [ "${EDGE_AGENT_ARM64:-1}" != 0 ] && [ "$(uname -m)" != aarch64 ]; then
  say "running the device-side tests on emulated aarch64"
  "$REPO/scripts/test-arm64.sh" "$@"
fi
