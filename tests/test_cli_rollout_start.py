"""`edge-agent fleet rollout start` and the fleet commands' --broker, through the real command line: what an
operator types either starts what it says or changes nothing, and no password is echoed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.cloud.fleet.state import StateDB

REPO = Path(__file__).resolve().parent.parent


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def start(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet("rollout", "start", "--model", "m", "--version", "3.0.0", *args, "--db", str(db))


def test_exponential_waves_are_taken_as_the_help_writes_them(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    run = start(db, "--to", "group:g", "--waves", "exp:10,2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("in waves exp:10,2\n"), run.stdout
    run = start(db, "--to", "group:h", "--waves", "1,exp:10,1.5,100%")
    assert run.returncode == 0, run.stderr
    assert [r.spec.waves for r in StateDB(db).rollouts()] == [("exp:10,2",), ("1", "exp:10,1.5", "100%")]


def test_a_refused_start_keeps_the_fleet_wide_hold(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    assert start(db, "--to", "group:north").returncode == 0  # north is busy with 3.0.0
    state = StateDB(db)
    with state.tx() as tx:
        state.hold(tx, "m", "3.0.0", "rolled back: p95", None)
    state.close()
    busy = start(db, "--to", "group:north", "--override-hold")
    assert busy.returncode == 1 and "group north already has rollout" in busy.stderr, busy.stderr
    assert StateDB(db).held("m", "3.0.0") == "rolled back: p95"  # the refused start released nothing
    elsewhere = start(db, "--to", "group:south")
    assert elsewhere.returncode == 1 and "is held fleet-wide (rolled back: p95)" in elsewhere.stderr
    assert start(db, "--to", "group:south", "--override-hold").returncode == 0
    assert StateDB(db).held("m", "3.0.0") is None


def test_a_password_in_the_broker_url_is_refused_and_never_echoed() -> None:
    run = fleet("status", "--broker", "mqtt://admin:hunter2@127.0.0.1:1")  # was: ignored, then echoed
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        "edge-agent fleet: --broker: put the user in --username and the password in --password-file, not in "
        "'mqtt://***@127.0.0.1:1'\n"
    )
