#!/usr/bin/env bash
# The whole test suite, from a fresh machine: virtualenv, Mosquitto, sample models, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k profile).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$REPO"

ensure_venv dev,cloud
ensure_mosquitto || say "Mosquitto is missing: broker tests will fail"
command -v espeak-ng >/dev/null || apt_install espeak-ng || say "espeak-ng is missing: the speech test will be skipped"
command -v chromium >/dev/null && command -v chromedriver >/dev/null \
  || apt_install chromium chromium-driver fonts-dejavu-core || say "chromium is missing: the status page browser test will be skipped"

say "running the test suite"
"$VENV/bin/python" -m pytest "$@"
