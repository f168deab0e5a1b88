#!/usr/bin/env bash
# Builds (once) and caches a separate virtualenv with onnxruntime-openvino, for the OpenVINO test and bench,
# and a folder of wheels for tests that install the builds with scripts/install.sh --wheels.
#
# onnxruntime-openvino ships the same `onnxruntime` module as the CPU wheel, so it can never share the
# project's .venv. This venv holds the project's other dependencies; run the project in it with
# PYTHONPATH=<repo>. Prints the venv's python on stdout; progress goes to stderr.
#
#   PY="$(scripts/openvino-venv.sh)" && PYTHONPATH=. "$PY" -m agent probe
#   WHEELS="$(scripts/openvino-venv.sh --wheels)"   # onnxruntime-openvino, onnxruntime, their dependencies
#
# Both are downloaded once: the wheels first, and the venv is built from them (plus the project's other
# dependencies from the package index).
# Environment: EDGE_AGENT_CACHE (default ~/.cache/edge-agent), ORT_OPENVINO_VERSION (default 1.24.1).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"

version="${ORT_OPENVINO_VERSION:-1.24.1}"
cache="${EDGE_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent}"
venv="$cache/venvs/onnxruntime-openvino-$version"
wheels="$cache/wheels/onnxruntime-openvino-$version"
# The wheel exists for x86-64 Linux only (and CPython 3.10 to 3.13 at 1.24.x).
if [ "$(uname -m)" != x86_64 ]; then
  say "onnxruntime-openvino has no wheel for $(uname -m); it needs x86-64"; exit 3
fi
py="$(find_python 2>/dev/null)" || { say "Python 3.10 or newer is needed"; exit 1; }
# Line 1: every dependency but onnxruntime itself, which the OpenVINO wheel replaces; line 2: onnxruntime's.
mapfile -t reqs < <("$py" - "$REPO/pyproject.toml" <<'PY'
import re, sys
try:
    import tomllib
    with open(sys.argv[1], "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
except ImportError:  # Python 3.10: the dependencies list is plain quoted strings
    text = open(sys.argv[1]).read()
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
def name(d):
    return re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].strip().lower()
print(" ".join(d for d in deps if name(d) != "onnxruntime"))
print(next(d for d in deps if name(d) == "onnxruntime"))
PY
)
deps="${reqs[0]}" cpu_req="${reqs[1]}"

mkdir -p "$cache/venvs" "$cache/wheels"
# Two test runs may build at once: one builds, the other waits for it.
exec 9>"$venv.lock"
command -v flock >/dev/null && flock 9

wheels_stamp="$wheels/.ready-$(printf '%s %s' "$version" "$cpu_req" | sha256sum | cut -c1-16)"
if [ ! -f "$wheels_stamp" ]; then
  say "downloading onnxruntime-openvino==$version and $cpu_req, with their dependencies, into $wheels"
  rm -rf "$wheels.tmp"
  "$py" -m pip download -q --disable-pip-version-check -d "$wheels.tmp" "onnxruntime-openvino==$version" "$cpu_req" >&2
  rm -rf "$wheels"
  mv "$wheels.tmp" "$wheels"
  touch "$wheels_stamp"
fi
if [ "${1:-}" = --wheels ]; then
  echo "$wheels"
  exit 0
fi

stamp="$venv/.ready-$(printf '%s %s' "$version" "$deps" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "building $venv (onnxruntime-openvino==$version and the project's other dependencies)"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  # shellcheck disable=SC2086 (deps is a list of requirement words)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --find-links "$wheels" \
    "onnxruntime-openvino==$version" $deps >&2
  "$venv/bin/python" -c "import onnxruntime as o; assert 'OpenVINOExecutionProvider' in o.get_available_providers(), o.get_available_providers()" >&2
  rm -f "$venv"/.ready-*
  touch "$stamp"
fi
echo "$venv/bin/python"
