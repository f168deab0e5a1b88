#!/usr/bin/env bash
# Builds (once) and caches a separate virtualenv with onnxruntime-openvino, for the OpenVINO test and bench.
#
# onnxruntime-openvino ships the same `onnxruntime` module as the CPU wheel, so it can never share the
# project's .venv. This venv holds the project's other dependencies; run the project in it with
# PYTHONPATH=<repo>. Prints the venv's python on stdout; progress goes to stderr.
#
#   PY="$(scripts/openvino-venv.sh)" && PYTHONPATH=. "$PY" -m agent probe
#
# Environment: EDGE_AGENT_CACHE (default ~/.cache/edge-agent), ORT_OPENVINO_VERSION (default 1.24.1).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"

version="${ORT_OPENVINO_VERSION:-1.24.1}"
cache="${EDGE_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent}"
venv="$cache/venvs/onnxruntime-openvino-$version"
# The wheel exists for x86-64 Linux only (and CPython 3.10 to 3.13 at 1.24.x).
if [ "$(uname -m)" != x86_64 ]; then
  say "onnxruntime-openvino has no wheel for $(uname -m); it needs x86-64"; exit 3
fi
py="$(find_python 2>/dev/null)" || { say "Python 3.10 or newer is needed"; exit 1; }
deps="$("$py" - "$REPO/pyproject.toml" <<'PY'
import re, sys
try:
    import tomllib
    with open(sys.argv[1], "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
except ImportError:  # Python 3.10: the dependencies list is plain quoted strings
    text = open(sys.argv[1]).read()
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
# Every dependency but onnxruntime itself, which the OpenVINO wheel replaces.
print(" ".join(d for d in deps if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].strip().lower() != "onnxruntime"))
PY
)"
stamp="$venv/.ready-$(printf '%s %s' "$version" "$deps" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  mkdir -p "$(dirname "$venv")"
  # Two test runs may build at once: one builds, the other waits for it.
  exec 9>"$venv.lock"
  command -v flock >/dev/null && flock 9
  if [ ! -f "$stamp" ]; then
    say "building $venv (onnxruntime-openvino==$version and the project's other dependencies)"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    # shellcheck disable=SC2086 (deps is a list of requirement words)
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "onnxruntime-openvino==$version" $deps >&2
    "$venv/bin/python" -c "import onnxruntime as o; assert 'OpenVINOExecutionProvider' in o.get_available_providers(), o.get_available_providers()" >&2
    rm -f "$venv"/.ready-*
    touch "$stamp"
  fi
fi
echo "$venv/bin/python"
