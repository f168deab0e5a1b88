#!/usr/bin/env bash
# Install edge-agent as a systemd service: the `edge-agent` user, a virtualenv in /opt/edge-agent,
# the package with the onnxruntime build this hardware wants (recorded, and kept by upgrades), a profile
# in /etc/edge-agent (an existing one is kept), the unit, enabled and started.
# Idempotent: a second run with the same sources changes nothing and does not restart the service.
# See docs/systemd.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install.sh [options]

  --from SRC       what to install: a source checkout or a wheel (default: this checkout)
  --profile FILE   the profile to install when /etc/edge-agent/profile.yaml does not exist yet
                   (default: a starter profile that runs no pipeline)
  --prefix DIR     where the virtualenv goes (default: /opt/edge-agent)
  --root DIR       write the tree under DIR instead of /, for images and tests: files only; user,
                   ownership and systemctl commands are printed as "would run: ..." instead
  --python PY      the interpreter for the virtualenv (default: the newest python3 >= 3.10)
  --runtime BUILD  the onnxruntime build: auto (what `edge-agent probe` says this hardware wants),
                   cpu, openvino (x86-64), cuda (x86-64 with an NVIDIA GPU) or jetson (JetPack 6).
                   Default: the build the last install recorded, else auto
  --runtime-index URL
                   the pip index to take the build from (default: NVIDIA's JetPack 6 index for jetson)
  --wheels DIR     install from the wheels in DIR only, without a package index (devices offline)
  --no-deps        install edge-agent alone; its dependencies must come from elsewhere
                   (for instance distribution packages with --system-site-packages); only a
                   --runtime named now or recorded before is installed
  --system-site-packages
                   let the virtualenv see the interpreter's own packages
  --no-start       enable the service but do not start or restart it now
  -h, --help       this text
EOF
}

# The service user reads the virtualenv and the unit: a root umask of 077 must not hide them.
umask 022

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit "${2:-1}"; }

ROOT=/
PREFIX=/opt/edge-agent
FROM=""
PROFILE=""
PYTHON=""
DEPS=1
SYSTEM_SITE=0
START=1
RUNTIME=""
RUNTIME_INDEX=""
WHEELS=""
SERVICE=edge-agent.service
USER_NAME=edge-agent
# The unit's SupplementaryGroups=: systemd refuses to start a service whose group does not exist.
DEVICE_GROUPS=(video render dialout)

while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="${2:?--from needs a path}"; shift 2 ;;
    --profile) PROFILE="${2:?--profile needs a file}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --runtime) RUNTIME="${2:?--runtime needs a build}"; shift 2 ;;
    --runtime-index) RUNTIME_INDEX="${2:?--runtime-index needs a URL}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --no-deps) DEPS=0; shift ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FROM="${FROM:-$REPO}"
case "$PREFIX" in /?*) PREFIX="${PREFIX%/}" ;; *) die "--prefix must be an absolute path, got '$PREFIX'" 2 ;; esac
[ -e "$FROM" ] || die "--from: $FROM does not exist" 2
[ -z "$PROFILE" ] || [ -f "$PROFILE" ] || die "--profile: $PROFILE is not a file" 2
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels: $WHEELS is not a directory" 2
case "$RUNTIME" in ""|auto|cpu|openvino|cuda|jetson) ;; *) die "--runtime: unknown build '$RUNTIME' (auto, cpu, openvino, cuda, jetson)" 2 ;; esac
[ "$DEPS" = 1 ] || [ "$RUNTIME" != auto ] || die "--runtime auto needs the dependencies (it asks the agent): name the build with --no-deps" 2
if [ "$ROOT" = / ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or with --root DIR to write the tree somewhere else)"
else
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
fi

dest() { if [ "$ROOT" = / ]; then printf '%s' "$1"; else printf '%s%s' "$ROOT" "$1"; fi; }

# Commands that change the running system rather than files: printed, not run, under --root
# (shell-quoted, with $WHEN as a trailing comment when the command is conditional).
system() {
  if [ "$ROOT" = / ]; then "$@"; return; fi
  printf 'would run:'; printf ' %q' "$@"; printf '%s\n' "${WHEN:+  # $WHEN}"
}

CHANGED=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Write DEST only when its content differs, so that a second run leaves every file (and its mtime) alone.
put() {  # put SRC DEST MODE [OWNER:GROUP]
  local src="$1" target="$2" mode="$3" owner="${4:-}"
  mkdir -p "$(dirname "$target")"
  if ! cmp -s "$src" "$target" 2>/dev/null; then
    cp "$src" "$target.tmp.$$"
    chmod "$mode" "$target.tmp.$$"
    mv -f "$target.tmp.$$" "$target"
    say "wrote ${target#"${ROOT%/}"}"
    CHANGED=1
  elif [ "$(stat -c %a "$target")" != "${mode#0}" ]; then
    chmod "$mode" "$target"
  fi
  [ -z "$owner" ] || own "$owner" "$target"
}

own() {  # own OWNER:GROUP PATH: chown when it differs (recorded under --root)
  if [ "$ROOT" != / ]; then
    system chown "$1" "${2#"$ROOT"}"
  elif [ "$(stat -c %U:%G "$2")" != "$1" ]; then
    chown "$1" "$2"
  fi
}

find_python() {
  local py
  for py in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  die "Python 3.10 or newer is needed (or give one with --python)"
}

# 1. The service user, and the device groups the unit names.
ensure_user() {
  local group
  for group in "${DEVICE_GROUPS[@]}"; do
    if [ "$ROOT" != / ]; then
      WHEN="if the group is missing" system groupadd --system "$group"
    elif ! getent group "$group" >/dev/null; then
      say "creating the system group $group"
      groupadd --system "$group"
    fi
  done
  if [ "$ROOT" != / ]; then
    WHEN="if the user is missing" system useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
      --shell /usr/sbin/nologin --comment "edge-agent daemon" "$USER_NAME"
  elif ! id "$USER_NAME" >/dev/null 2>&1; then
    say "creating the system user $USER_NAME"
    useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
      --shell "$(command -v nologin || echo /usr/sbin/nologin)" --comment "edge-agent daemon" "$USER_NAME"
  fi
}

# 2. The virtualenv, created once; recreated only when it no longer runs (its Python was removed).
VENV="$(dest "$PREFIX/venv")"
ensure_venv() {
  if "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    return
  fi
  local py="${PYTHON:-$(find_python)}" args=(--clear)
  [ "$SYSTEM_SITE" = 0 ] || args+=(--system-site-packages)
  say "creating the virtualenv $PREFIX/venv with $py"
  mkdir -p "$(dirname "$VENV")"
  if ! "$py" -m venv "${args[@]}" "$VENV"; then
    die "could not create a virtualenv with $py (on Debian and Ubuntu: apt-get install python3-venv)"
  fi
  CHANGED=1
}

# 3. The package: installed again only when the source (or the onnxruntime build) differs from what was
# installed last.
BUILD_FILES=(agent pyproject.toml README.md)
[ ! -f "$FROM/LICENSE" ] || BUILD_FILES+=(LICENSE)  # pyproject.toml's license-files
source_digest() {
  if [ -f "$FROM" ]; then
    sha256sum "$FROM" | cut -c1-64
  else
    (cd "$FROM" && find "${BUILD_FILES[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
  fi
}

pip_install() {  # pip_install ARGS...: into the virtualenv, from --wheels only when given
  local source=()
  [ -z "$WHEELS" ] || source=(--no-index --find-links "$WHEELS")
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "${source[@]}" "$@" >&2
}

# The onnxruntime build and what goes with it, decided by the installed agent (agent/cli/probe.py:
# install_plan; it needs only the standard library, so it runs before the dependencies are installed).
PLAN_BUILD="" PLAN_REASON="" PLAN_REQUIREMENT="" PLAN_INDEX="" PLAN_DEPS=() PLAN_REMOVE=()
plan() {  # plan BUILD|auto: sets the PLAN_* variables; fails with the agent's reason in $WORK/plan.err
  local out key value line
  out="$("$VENV/bin/python" -I -c 'import sys; from agent.cli.probe import print_install_plan as p; sys.exit(p(sys.argv[1:]))' \
    "$1" 2>"$WORK/plan.err")" || return 1
  PLAN_DEPS=() PLAN_REMOVE=()
  while IFS= read -r line; do
    key="${line%%=*}" value="${line#*=}"
    case "$key" in
      build) PLAN_BUILD="$value" ;;
      reason) PLAN_REASON="$value" ;;
      requirement) PLAN_REQUIREMENT="$value" ;;
      index_url) PLAN_INDEX="${RUNTIME_INDEX:-$value}" ;;
      dependency) PLAN_DEPS+=("$value") ;;
      remove) PLAN_REMOVE+=("$value") ;;
    esac
  done <<< "$out"
}

install_runtime() {  # install_runtime BUILD|auto [WHY]: that onnxruntime build in place of any other (and,
  # with the dependencies, the agent's other requirements in the same pip run); sets BUILT
  local requested="$1" why="${2:-}" deps=() index=()
  plan "$requested" || die "--runtime $requested: $(cat "$WORK/plan.err")" 2
  if [ "$PLAN_BUILD" = jetson ] && [ -z "$PLAN_INDEX" ] && [ -z "$WHEELS" ]; then
    die "--runtime jetson: no pip index known for this L4T release; give NVIDIA's with --runtime-index URL" 2
  fi
  if [ "${#PLAN_REMOVE[@]}" -gt 0 ]; then
    say "removing ${PLAN_REMOVE[*]}: one onnxruntime build per virtualenv"
    "$VENV/bin/python" -m pip uninstall -q -y "${PLAN_REMOVE[@]}" >&2
  fi
  [ "$DEPS" = 0 ] || deps=("${PLAN_DEPS[@]}")
  if [ -n "$PLAN_INDEX" ] && [ -z "$WHEELS" ]; then
    # The build's own index serves the build alone; everything else comes from the usual one.
    [ "${#deps[@]}" = 0 ] || pip_install "${deps[@]}" || die "could not install the dependencies (above)"
    deps=() index=(--index-url "$PLAN_INDEX")
  fi
  say "installing the onnxruntime build '$PLAN_BUILD' ($PLAN_REQUIREMENT): ${why:-$PLAN_REASON}"
  [ "$PLAN_BUILD" = cpu ] || say "(pip's note that edge-agent requires onnxruntime is expected: $PLAN_REQUIREMENT provides it)"
  if ! pip_install "${index[@]}" "${deps[@]}" "$PLAN_REQUIREMENT"; then
    [ "$requested" = auto ] && [ "$PLAN_BUILD" != cpu ] || die "could not install $PLAN_REQUIREMENT (above)"
    say "could not install $PLAN_REQUIREMENT (above); installing the CPU build instead"
    plan cpu || die "$(cat "$WORK/plan.err")"
    pip_install "${deps[@]}" "$PLAN_REQUIREMENT" || die "could not install $PLAN_REQUIREMENT (above)"
  fi
  BUILT="$PLAN_BUILD"
}

agent_runs() { "$VENV/bin/python" -I -c 'import agent' >/dev/null 2>&1; }

ensure_package() {
  local stamp_file stamp wheel want why="" decided
  stamp_file="$(dest "$PREFIX/.installed")"
  # The build: named now, else the one recorded (an upgrade keeps it), else auto (none with --no-deps).
  # An install from before builds were recorded had the plain one: upgrades keep that too.
  want="$RUNTIME"
  if [ -z "$want" ] && [ -f "$stamp_file" ]; then
    want="$(sed -n 's/.* runtime=\([a-z]*\).*/\1/p' "$stamp_file")"
    [ -n "$want" ] || [ "$DEPS" = 0 ] || want=cpu
    why="the build the last install recorded (--runtime auto decides again)"
  fi
  want="${want:-$([ "$DEPS" = 1 ] && echo auto || echo none)}"
  decided="$want"
  if [ "$want" = auto ] && agent_runs && plan auto; then
    decided="$PLAN_BUILD"  # by the agent installed now, to compare with the stamp
  fi
  stamp="edge-agent source-sha256=$(source_digest) deps=$DEPS runtime=$decided"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && agent_runs; then
    say "edge-agent is installed from the same source already (onnxruntime build: $decided)"
    return
  fi
  if [ -f "$FROM" ]; then
    case "$FROM" in *.whl) wheel="$FROM" ;; *) die "--from: $FROM is neither a checkout nor a .whl" 2 ;; esac
  else
    # Build from a copy, so that the checkout gets no build/ folder and no stale files ride along.
    [ -f "$FROM/pyproject.toml" ] || die "--from: $FROM has no pyproject.toml" 2
    mkdir -p "$WORK/src" "$WORK/wheel"
    tar -C "$FROM" --exclude=__pycache__ --exclude='*.pyc' -cf - "${BUILD_FILES[@]}" | tar -C "$WORK/src" -xf -
    say "building the edge-agent wheel"
    "$VENV/bin/python" -m pip wheel -q --no-deps --disable-pip-version-check -w "$WORK/wheel" "$WORK/src" >&2
    wheel="$(ls "$WORK"/wheel/edge_agent-*.whl)"
  fi
  say "installing $(basename "$wheel")$([ "$DEPS" = 1 ] && echo ' and its dependencies')"
  # --force-reinstall: a rebuilt wheel keeps its version number, and pip would call it satisfied.
  # --no-deps: the dependencies come next, with the chosen onnxruntime build in place of the plain one.
  pip_install -q --no-deps --force-reinstall "$wheel"
  BUILT=none
  [ "$want" = none ] || install_runtime "$want" "$why"
  printf '%s\n' "edge-agent source-sha256=$(source_digest) deps=$DEPS runtime=$BUILT" > "$stamp_file"
  CHANGED=1
}

# Under --root the virtualenv was made at ROOT/opt/...; its scripts must name /opt/... as on the device.
relocate_venv() {
  [ "$ROOT" != / ] || return 0
  local f
  { grep -rlIF -- "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" 2>/dev/null || true; } | while read -r f; do
    sed -i "s#$VENV#$PREFIX/venv#g" "$f"
  done
}

# 4. The unit and its restart drop-in, the profile, the documentation.
install_files() {
  sed "s#/opt/edge-agent#$PREFIX#g" "$REPO/systemd/edge-agent.service" > "$WORK/edge-agent.service"
  put "$WORK/edge-agent.service" "$(dest /etc/systemd/system/$SERVICE)" 0644
  # Spaced restarts of a crash loop (systemd 254+; older ones warn once per reload and ignore it).
  put "$REPO/systemd/$SERVICE.d/restart-backoff.conf" "$(dest /etc/systemd/system/$SERVICE.d/restart-backoff.conf)" 0644
  put "$REPO/docs/systemd.md" "$(dest "$PREFIX/share/doc/systemd.md")" 0644

  local etc profile
  etc="$(dest /etc/edge-agent)"
  mkdir -p "$etc"
  chmod 0755 "$etc"
  if [ -f "$REPO/configs/profile.schema.json" ]; then
    put "$REPO/configs/profile.schema.json" "$etc/profile.schema.json" 0644
  fi
  profile="$etc/profile.yaml"
  if [ -e "$profile" ]; then
    if [ -n "$PROFILE" ] && ! cmp -s "$PROFILE" "$profile"; then
      say "keeping the existing /etc/edge-agent/profile.yaml; $PROFILE was not installed (remove the old one first)"
    else
      say "keeping the existing /etc/edge-agent/profile.yaml"
    fi
  else
    if [ -n "$PROFILE" ]; then
      cp "$PROFILE" "$WORK/profile.yaml"
    else
      local id
      id="$(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null || echo edge-device)"
      id="$(printf '%s' "$id" | tr -c 'A-Za-z0-9_.-' '-' | sed 's/^[^A-Za-z0-9]*//' | cut -c1-64)"
      sed "s/@DEVICE_ID@/${id:-edge-device}/" "$REPO/systemd/profile.yaml" > "$WORK/profile.yaml"
    fi
    put "$WORK/profile.yaml" "$profile" 0640
  fi
  own "root:$USER_NAME" "$profile"
}

check_profile() {
  [ "$DEPS" = 1 ] || return 0
  if ! "$VENV/bin/python" -I -m agent check "$(dest /etc/edge-agent/profile.yaml)" >&2; then
    die "the profile has errors (above): fix /etc/edge-agent/profile.yaml and run install.sh again; the service was not started"
  fi
}

# 4b. The device's identity key (docs/fleet.md, "The inventory"), made now so that its public half can
# be enrolled before the first start (the agent makes it at its first start otherwise).
enroll_identity() {
  [ "$DEPS" = 1 ] && [ "$ROOT" = / ] || return 0
  local out key
  if ! out="$("$VENV/bin/python" -I -m agent fleet enroll --profile "$(dest /etc/edge-agent/profile.yaml)" 2>&1)"; then
    say "no identity key made now (the agent makes it at its first start): $out"
    return 0
  fi
  key="$(printf '%s\n' "$out" | sed -n 's/^# identity key: //p')"
  if [ -n "$key" ] && [ -f "$key" ]; then
    own "$USER_NAME:$USER_NAME" "$(dirname "$key")"
    own "$USER_NAME:$USER_NAME" "$key"
  fi
  say "this device's entry for the fleet inventory (add it to the file the rollout controller reads):"
  printf '%s\n' "$out" | grep -v '^#' >&2
}

# 5. systemd: reload, enable, and start (restart only when something changed).
activate() {
  local verb=start
  [ "$CHANGED" = 0 ] || verb=restart
  if [ "$ROOT" = / ] && [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: $SERVICE is installed but not enabled or started"
    return
  fi
  system systemctl daemon-reload
  system systemctl enable "$SERVICE"
  if [ "$START" = 1 ]; then
    system systemctl "$verb" "$SERVICE"
  else
    say "--no-start: $SERVICE is enabled and starts at the next boot (or: systemctl start $SERVICE)"
  fi
}

ensure_user
ensure_venv
ensure_package
relocate_venv
install_files
check_profile
enroll_identity
activate
if [ "$CHANGED" = 0 ]; then say "nothing changed"; else say "edge-agent is installed in $PREFIX"; fi
