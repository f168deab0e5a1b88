# Shared set-up for the README's commands: a virtualenv with the project, and system packages.
# Sourced, not run. Works on a fresh Debian/Ubuntu machine with only Python 3.10+.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${EDGE_AGENT_VENV:-$REPO/.venv}"

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_install() {
  # apt_install PACKAGE...: install Debian packages that are missing; say so when it cannot.
  command -v apt-get >/dev/null || { say "apt-get not found: install $* by hand"; return 1; }
  say "installing $* with apt-get"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; then
    as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
      || { say "could not install $* (need root or sudo)"; return 1; }
  fi
}

find_python() {
  for py in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  say "Python 3.10 or newer is needed"; return 1
}

ensure_venv() {
  # ensure_venv EXTRAS: create the virtualenv once and (re)install the project when pyproject.toml changed.
  local extras="$1" py stamp
  py="$(find_python)"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$py" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && "$py" -m venv "$VENV"; }
  fi
  stamp="$VENV/.edge-agent-$extras.$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    say "installing edge-agent[$extras] and its dependencies"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[$extras]"
    rm -f "$VENV"/.edge-agent-"$extras".*
    touch "$stamp"
  fi
}

ensure_mosquitto() {
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto mosquitto-clients
}
