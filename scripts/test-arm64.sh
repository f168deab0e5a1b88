#!/usr/bin/env bash
# The device-side tests (marked `arm64`) on an aarch64 Python, emulated with qemu-user on an x86-64 host.
#
#   scripts/test-arm64.sh [PYTEST ARGS...]      e.g. scripts/test-arm64.sh -k profile -x
#
# Once, cached under ${EDGE_AGENT_CACHE:-~/.cache/edge-agent}/arm64 (outside the repo): a Debian bookworm
# arm64 root with python3 (debootstrap --foreign, packages unpacked with dpkg-deb -x: no binfmt_misc, no
# container engine, no chroot), and a site dir with the aarch64 wheels of the project's dependencies plus
# pytest. Then it runs `pytest -m arm64` under qemu-aarch64-static with the repo on PYTHONPATH and prints
# how many tests ran. The site dir is rebuilt when pyproject.toml's dependencies (or the host venv's pinned
# versions) change; delete the cache dir to rebuild everything. See docs/arm64.md.
#
# On an aarch64 machine (a Raspberry Pi, a Jetson) nothing is emulated: it runs scripts/test.sh -m arm64.
# Settings: EDGE_AGENT_CACHE, EDGE_AGENT_QEMU_CPU (default neoverse-n1; also cortex-a76, cortex-a72,
# cortex-a57, cortex-a55, cortex-a53), EDGE_AGENT_DEBIAN_MIRROR (default: the one apt uses here),
# EDGE_AGENT_ARM64_SKIP (packages of the extras not installed for aarch64).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$REPO"

if [ "$(uname -m)" = aarch64 ]; then
  say "this machine is aarch64: running the marked tests natively"
  exec "$REPO/scripts/test.sh" -m arm64 "$@"
fi

CACHE="${EDGE_AGENT_CACHE:-$HOME/.cache/edge-agent}/arm64"
ROOT="$CACHE/root"
QEMU_CPU_NAME="${EDGE_AGENT_QEMU_CPU:-neoverse-n1}"
PYVER=3.11   # Debian bookworm's python3
T0=$SECONDS

# --- host tools --------------------------------------------------------------------------------------
command -v qemu-aarch64-static >/dev/null || apt_install qemu-user-static || exit 1
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || apt_install debootstrap || exit 1
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || apt_install debian-archive-keyring || true
ensure_mosquitto || say "Mosquitto is missing: broker tests will fail"
QEMU="$(command -v qemu-aarch64-static)"
HOSTPY="$(find_python 2>/dev/null)" || { say "Python 3.10 or newer is needed"; exit 1; }
mkdir -p "$CACHE"
# One build at a time (CI and a developer, or two checkouts, may share the cache); runs do not wait.
exec 9>"$CACHE/.lock"
command -v flock >/dev/null && { flock -n 9 || { say "waiting for another build of $CACHE"; flock 9; }; }

# A host Python with pip to fetch the aarch64 wheels: the project's venv, else a small venv of our own.
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  PIPPY="$VENV/bin/python"
else
  [ -x "$CACHE/pip-venv/bin/python" ] \
    || "$HOSTPY" -m venv "$CACHE/pip-venv" || { apt_install python3-venv && "$HOSTPY" -m venv "$CACHE/pip-venv"; }
  PIPPY="$CACHE/pip-venv/bin/python"
fi

debian_mirror() {
  if [ -n "${EDGE_AGENT_DEBIAN_MIRROR:-}" ]; then echo "$EDGE_AGENT_DEBIAN_MIRROR"; return; fi
  # The mirror apt already uses for bookworm here (it may be a local proxy or snapshot), else Debian's CDN.
  local url
  url="$(apt-cache policy 2>/dev/null | awk '$3 == "bookworm/main" && $2 ~ /^https?:/ {print $2; exit}')"
  echo "${url:-http://deb.debian.org/debian}"
}

# --- the aarch64 root filesystem ---------------------------------------------------------------------
if [ ! -f "$ROOT/.complete" ]; then
  mirror="$(debian_mirror)"
  say "building the arm64 Debian bookworm root (once) in $ROOT from $mirror"
  as_root rm -rf "$ROOT.tmp"
  as_root debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT.tmp" "$mirror" \
    > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; say "debootstrap failed (log: $CACHE/debootstrap.log)"; exit 1; }
  # The second stage needs binfmt_misc to run the packages' scripts; unpacking them is all python3 needs.
  for deb in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do as_root dpkg-deb -x "$deb" "$ROOT.tmp"; done
  as_root rm -f "$ROOT.tmp"/var/cache/apt/archives/*.deb
  [ "$(id -u)" = 0 ] || as_root chown -R "$(id -u):$(id -g)" "$ROOT.tmp"
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.complete"
fi
# qemu's -L looks a path up under ROOT first, so a directory that exists there hides the host's from
# os.listdir(): /dev (cameras, /dev/shm), /tmp, /sys, /root must be the host's. Only /proc stays (below).
# For the same reason the standard library is byte-compiled here, as the packages' postinst would have:
# a .pyc missing under ROOT would be looked up, and written, in the host's /usr/lib/python3.11.
if [ ! -f "$ROOT/.tidy-v2" ]; then
  as_root rm -rf "$ROOT/dev" "$ROOT/tmp" "$ROOT/run" "$ROOT/sys" "$ROOT/home" "$ROOT/root" "$ROOT/boot" \
    "$ROOT/mnt" "$ROOT/media" "$ROOT/srv" "$ROOT/opt" "$ROOT/var/tmp" "$ROOT/debootstrap"
  if "$HOSTPY" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYVER'.split('.'))))"; then
    "$HOSTPY" -m compileall -q -j 0 "$ROOT/usr/lib/python$PYVER" "$ROOT/usr/lib/python3/dist-packages" >/dev/null 2>&1 || true
  else   # the emulated Python compiles its own (slower)
    "$QEMU" -cpu "$QEMU_CPU_NAME" -L "$ROOT" "$ROOT/usr/bin/python3" -S -m compileall -q "/usr/lib/python$PYVER" >/dev/null 2>&1 || true
  fi
  rm -f "$ROOT/.tidy-v1" && touch "$ROOT/.tidy-v2"
fi

# --- the aarch64 wheels ------------------------------------------------------------------------------
# The device dependencies, the cloud extra (tests/helpers/models.py builds tiny models with onnx) and the
# dev extra, less what is heavy and not needed by device tests. Versions follow the host venv when it
# has them, so both suites test the same releases.
# onnxruntime-extensions 0.15 has no aarch64 wheel (its tests skip without it).
ARM64_SKIP="${EDGE_AGENT_ARM64_SKIP:-scikit-learn skl2onnx onnxruntime-extensions}"
TOMLPY=("$HOSTPY")   # tomllib is 3.11+: on an older host, the root's Python 3.11 reads pyproject.toml
"$HOSTPY" -c 'import tomllib' 2>/dev/null || TOMLPY=("$QEMU" -cpu "$QEMU_CPU_NAME" -L "$ROOT" "$ROOT/usr/bin/python3" -S)
REQS="$("${TOMLPY[@]}" - "$ARM64_SKIP" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = {s.lower() for s in sys.argv[1].split()}
reqs = list(project["dependencies"])
for extra in ("cloud", "dev"):
    reqs += project.get("optional-dependencies", {}).get(extra, [])
for r in reqs:
    if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() not in skip:
        print(r)
PY
)"
PINS=""
if [ -x "$VENV/bin/python" ]; then
  PINS="$("$VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^edge-agent==' || true)"
fi
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done   # bookworm: glibc 2.36
KEY="$(printf '%s\n--\n%s\n' "$REQS" "$PINS" | sha256sum | cut -c1-12)"
SITE="$CACHE/site-$KEY"
if [ ! -f "$SITE/.complete" ]; then
  say "installing the aarch64 wheels (once per dependency set) into $SITE"
  rm -rf "$SITE.tmp" && mkdir -p "$SITE.tmp"
  printf '%s\n' "$REQS" > "$SITE.tmp/requirements.txt"
  printf '%s\n' "$PINS" > "$SITE.tmp/constraints.txt"
  pip_arm64() {
    # No machine-local pip configuration (local indexes, find-links of x86 wheels): the index's aarch64 wheels.
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
      "$PIPPY" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$SITE.tmp/lib" \
      --only-binary=:all: "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" "$@"
  }
  if ! pip_arm64 -r "$SITE.tmp/requirements.txt" -c "$SITE.tmp/constraints.txt"; then
    say "the host venv's versions have no complete set of aarch64 wheels: resolving without them"
    rm -rf "$SITE.tmp/lib"
    pip_arm64 -r "$SITE.tmp/requirements.txt"
  fi
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
  touch "$SITE/.complete"
  # Keep the previous set too (another branch or checkout may use it), drop older ones.
  ls -dt "$CACHE"/site-*/ 2>/dev/null | tail -n +3 | while IFS= read -r old; do rm -rf "$old"; done
fi

# sys.executable of the emulated Python: a host script, so that subprocesses of sys.executable (and
# multiprocessing's spawn) start the emulated Python again instead of failing with "Exec format error".
# It finds the repo and the wheels even when a test gives its subprocess a bare environment, as the
# editable install does on the host. -S (no site module): a path missing under ROOT falls through to the
# host's, so the host's /usr/lib/python3/dist-packages and /usr/local/lib/python3.11/dist-packages (x86
# extension modules, .pth files) would otherwise join the emulated sys.path.
mkdir -p "$CACHE/bin"
cat > "$CACHE/bin/python3.new" <<SH
#!/bin/sh
export EDGE_AGENT_EMULATED=1 EDGE_AGENT_QEMU_CPU="\${EDGE_AGENT_QEMU_CPU:-$QEMU_CPU_NAME}"
export PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$REPO:$SITE/lib"
exec "$QEMU" -cpu "\$EDGE_AGENT_QEMU_CPU" -L "$ROOT" -0 "\$0" "$ROOT/usr/bin/python3" -S "\$@"
SH
chmod +x "$CACHE/bin/python3.new"
if cmp -s "$CACHE/bin/python3.new" "$CACHE/bin/python3"; then rm "$CACHE/bin/python3.new"; else mv "$CACHE/bin/python3.new" "$CACHE/bin/python3"; fi

# --- what the emulated kernel shows ------------------------------------------------------------------
# qemu's -L makes the emulated process read ROOT/<path> when it exists. onnxruntime's cpuinfo library
# crashes on an x86 /proc/cpuinfo, so the root gets an arm64 one whose Features are exactly the hwcaps
# qemu gives the emulated CPU (read from the emulated process's aux vector); /proc/sys/kernel/arch says
# aarch64 as the kernel of a real board would. Everything else in /proc and /sys is the host's.
CPUS="$(nproc)"
STAMP="$QEMU_CPU_NAME cpus=$CPUS"
if [ "$(cat "$ROOT/proc/.edge-agent" 2>/dev/null)" != "$STAMP" ]; then
  mkdir -p "$ROOT/proc/sys/kernel"
  echo aarch64 > "$ROOT/proc/sys/kernel/arch"
  EDGE_AGENT_QEMU_CPU="$QEMU_CPU_NAME" "$CACHE/bin/python3" -c "
import sys
from tests.helpers.platform import arm_cpuinfo, hwcap_features
sys.stdout.write(arm_cpuinfo(hwcap_features(), $CPUS, '$QEMU_CPU_NAME'))" > "$ROOT/proc/cpuinfo.new"
  mv "$ROOT/proc/cpuinfo.new" "$ROOT/proc/cpuinfo"
  echo "$STAMP" > "$ROOT/proc/.edge-agent"
fi
say "aarch64 environment ready in $((SECONDS - T0))s: $QEMU_CPU_NAME x$CPUS,$(grep -m1 Features "$ROOT/proc/cpuinfo" | cut -d: -f2-)"

# --- the run -----------------------------------------------------------------------------------------
command -v flock >/dev/null && flock -u 9
exec 9>&-
# Collect only the test files that mention the marker: importing every test module under emulation costs
# seconds each, and modules that need host-only packages (scikit-learn) must not break the run.
FILES=()
explicit=no
for arg in "$@"; do case "$arg" in tests*|*.py|*::*) explicit=yes ;; esac; done
if [ "$explicit" = no ]; then
  while IFS= read -r f; do FILES+=("$f"); done < <(grep -rlE --include='test_*.py' 'mark\.arm64|"arm64"' tests | sort)
  [ "${#FILES[@]}" -gt 0 ] || { say "no test file is marked arm64"; exit 5; }
fi

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT
say "running pytest -m arm64 under qemu-aarch64 ($QEMU_CPU_NAME)"
T1=$SECONDS
set +e
# Two workers: emulation is compute-bound, but the tests still spend much of their time waiting on agents.
EDGE_AGENT_QEMU_CPU="$QEMU_CPU_NAME" "$CACHE/bin/python3" -m pytest -m arm64 -p no:cacheprovider -n "${EDGE_AGENT_ARM64_WORKERS:-2}" \
  --junitxml="$RESULTS/junit.xml" "${FILES[@]}" "$@"
rc=$?
set -e
"$HOSTPY" - "$RESULTS/junit.xml" "$((SECONDS - T1))" <<'PY' || true
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    sys.exit("arm64: no test report (pytest did not get as far as running tests)")
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"arm64 (emulated aarch64): {n['tests']} tests ran in {sys.argv[2]}s: {passed} passed, "
      f"{n['skipped']} skipped, {n['failures']} failed, {n['errors']} errors")
PY
exit $rc
