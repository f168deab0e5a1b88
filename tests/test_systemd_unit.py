"""systemd/edge-agent.service: what the unit promises, and `systemd-analyze verify` finding nothing to say."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
DROP_IN = REPO / "systemd" / "edge-agent.service.d" / "restart-backoff.conf"
EXEC_START = "/opt/edge-agent/venv/bin/edge-agent run --profile /etc/edge-agent/profile.yaml"
HOST_UNITS = Path("/usr/lib/systemd/system")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of (key, value) pairs in file order; repeated keys (DeviceAllow=) stay repeated."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a setting outside any section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0]


def verify(
    unit_text: str,
    tmp_path: Path,
    executables: dict[str, Path] | None = None,
    drop_ins: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a unit as installed, in a scratch root that holds the host's
    units (the targets it orders against), /bin/kill for ExecReload, the given executables
    at their paths (by default a stand-in for the ExecStart program) and drop-ins (name: text) in
    the unit's `.d` folder, where systemd reads them."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not HOST_UNITS.is_dir():
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    root = tmp_path / "verify-root"
    shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
    kill = Path(shutil.which("kill") or "/bin/kill")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(kill, root / "bin" / "kill")
    if executables is None:
        stand_in = tmp_path / "edge-agent"
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        executables = {EXEC_START.split()[0]: stand_in}
    for path, source in executables.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    unit = root / "etc/systemd/system/edge-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(unit_text)
    for name, text in (drop_ins or {}).items():
        (unit.parent / f"{unit.name}.d").mkdir(exist_ok=True)
        (unit.parent / f"{unit.name}.d" / name).write_text(text)
    return subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", str(unit)], capture_output=True, text=True, timeout=120
    )


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    out = verify(UNIT.read_text(), tmp_path)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    # The check above is only worth something if the same set-up reports problems.
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=on-failure\nWatchDogSec=5s")
    out = verify(broken, tmp_path)
    assert "Unknown key 'WatchDogSec'" in out.stderr
    missing = verify(UNIT.read_text(), tmp_path / "missing", executables={})
    assert "/opt/edge-agent/venv/bin/edge-agent is not executable" in missing.stderr and missing.returncode != 0


def test_service_contract() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    assert one(service, "Type") == "notify" and one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == EXEC_START
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one(service, "WatchdogSec"))
    assert one(service, "User") == "edge-agent"
    assert {"video", "render"} <= set(one(service, "SupplementaryGroups").split())
    for key in ("StateDirectory", "ConfigurationDirectory", "CacheDirectory"):
        assert one(service, key) == "edge-agent"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_a_crash_loop_never_leaves_the_device_down_for_good() -> None:
    """Issue 17, item 11: StartLimitBurst=5 in 10 minutes stopped the service for good. The start limit is
    off (in [Unit], where systemd reads it) and every failure restarts after a pause."""
    unit = parse_unit(UNIT.read_text())
    assert one(unit["Unit"], "StartLimitIntervalSec") == "0"
    assert not values(unit["Unit"], "StartLimitBurst"), "a burst without an interval is dead configuration"
    assert not values(unit["Service"], "StartLimitBurst") and not values(unit["Service"], "StartLimitIntervalSec")
    assert one(unit["Service"], "Restart") in ("on-failure", "always")
    assert re.fullmatch(r"[1-9]\d*s", one(unit["Service"], "RestartSec"))  # spaced, never a tight loop
    docs = (REPO / "docs" / "systemd.md").read_text()
    assert "`StartLimitIntervalSec=0`" in docs and "restart-backoff.conf" in docs


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[1])


def assert_clean_but_for_old_systemd(out: subprocess.CompletedProcess[str], where: str) -> None:
    """On systemd 254+ `verify` found nothing; on an older one only RestartSteps= and RestartMaxDelaySec=
    are unknown, in `where` (the file systemd read them from)."""
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    if systemd_version() >= 254:
        assert complaints == []
    else:
        assert len(complaints) == 2 and all("Unknown key" in c and where in c for c in complaints), complaints
        assert "RestartSteps" in complaints[0] + complaints[1] and "RestartMaxDelaySec" in complaints[0] + complaints[1]


def test_restart_backoff_drop_in_verifies_or_is_only_unknown_to_old_systemd(tmp_path: Path) -> None:
    """RestartSteps=/RestartMaxDelaySec= (systemd 254+) live in a drop-in: on 254+ `verify` is clean; on an
    older systemd its only complaints are those two unknown keys, and the unit itself stays clean."""
    service = parse_unit(DROP_IN.read_text())["Service"]
    assert one(service, "RestartSteps") == "8" and one(service, "RestartMaxDelaySec") == "5min"
    out = verify(UNIT.read_text(), tmp_path, drop_ins={DROP_IN.name: DROP_IN.read_text()})
    assert_clean_but_for_old_systemd(out, f"edge-agent.service.d/{DROP_IN.name}")


def test_hardening_keeps_devices_reachable() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    assert one(service, "ProtectSystem") == "strict"
    assert not values(service, "PrivateDevices"), "PrivateDevices hides /dev/video* and every accelerator"
    assert not values(service, "MemoryDenyWriteExecute"), "JIT compilers in execution providers need W+X memory"
    assert not values(service, "ProcSubset"), "health reads /proc/meminfo and /proc/stat"
    assert one(service, "DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in values(service, "DeviceAllow")}
    for needed in ("char-video4linux", "char-drm", "char-nvidia*", "char-accel", "char-hailo*", "char-usb_device"):
        assert needed in allowed


def test_every_device_line_is_explained_in_the_docs() -> None:
    docs = (REPO / "docs" / "systemd.md").read_text()
    service = parse_unit(UNIT.read_text())["Service"]
    for spec in {v.split()[0] for v in values(service, "DeviceAllow")}:
        assert f"`{spec}`" in docs, f"docs/systemd.md does not explain DeviceAllow={spec}"
    for key in ("ProtectSystem", "NoNewPrivileges", "SystemCallFilter", "RestrictAddressFamilies", "DevicePolicy"):
        assert key in docs
