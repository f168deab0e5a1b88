"""How the rollout controller is installed: systemd/edge-agent-controller.service (what the unit promises,
`systemd-analyze verify` finding nothing to say, its command line parsing with the real CLI) and the
`controller` service of images/compose.yaml (its command, its mounts, the inventory it reads)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from agent.cli import build_parser
from agent.cloud.fleet.enrollment import load_enrollment
from tests.test_systemd_unit import one, parse_unit, values, verify

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent-controller.service"
PROGRAM = "/opt/edge-agent/venv/bin/edge-agent"
CONFIG = "/etc/edge-agent-controller"


def exec_start() -> list[str]:
    """ExecStart as systemd splits it, with the environment file's variables as an operator sets them."""
    service = parse_unit(UNIT.read_text().replace("\\\n", " "))["Service"]
    line = one(service, "ExecStart")
    line = line.replace("${EDGE_AGENT_BROKER}", "mqtts://broker.example.com:8883")
    line = line.replace("$EDGE_AGENT_BROKER_ARGS", "--username fleet --password-file /etc/fleet.pw")
    return shlex.split(line)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    stand_in = tmp_path / "edge-agent"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    out = verify(UNIT.read_text(), tmp_path, executables={PROGRAM: stand_in})
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_verify_would_catch_a_mistake_in_this_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Restart=always", "Restart=always\nRestartSecs=5s")
    out = verify(broken, tmp_path, executables={})
    assert "Unknown key 'RestartSecs'" in out.stderr and f"{PROGRAM} is not executable" in out.stderr


def test_the_unit_runs_the_controller_with_what_its_configuration_directory_holds() -> None:
    argv = exec_start()
    assert argv[0] == PROGRAM and argv[1:3] == ["fleet", "controller"]
    args = build_parser().parse_args(argv[1:])  # the real CLI takes the line as systemd passes it
    assert args.handler.__name__ == "controller" and args.username == "fleet"
    assert args.inventory == Path(f"{CONFIG}/inventory.yaml") and args.broker.startswith("mqtts://")
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    env = " ".join(values(service, "Environment"))
    # the state file and the key come from the environment the CLI reads (EDGE_AGENT_CONTROLLER_DB, ..._KEY)
    assert "EDGE_AGENT_CONTROLLER_DB=/var/lib/edge-agent-controller/controller.db" in env
    assert f"EDGE_AGENT_REGISTRY_KEY={CONFIG}/registry.key" in env
    assert one(service, "EnvironmentFile") == f"{CONFIG}/controller.env"
    assert one(service, "StateDirectory") == one(service, "ConfigurationDirectory") == "edge-agent-controller"
    assert one(service, "User") == "edge-agent-controller"


def test_the_unit_restarts_the_controller_whatever_ended_it_but_bad_configuration() -> None:
    """kill -9 at any point is safe (tests/test_controller.py): systemd starts it again, always, with no
    start limit that a long broker outage would use up; exit 2 (bad configuration) is not retried."""
    unit = parse_unit(UNIT.read_text())
    assert one(unit["Service"], "Restart") == "always" and one(unit["Service"], "RestartSec") == "5s"
    assert one(unit["Unit"], "StartLimitIntervalSec") == "0" and not values(unit["Unit"], "StartLimitBurst")
    assert not values(unit["Service"], "StartLimitBurst") and not values(unit["Service"], "StartLimitIntervalSec")
    assert one(unit["Service"], "RestartPreventExitStatus") == "2"
    assert "network-online.target" in one(unit["Unit"], "After")
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_the_controller_needs_no_device_and_is_hardened_for_it() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    assert one(service, "ProtectSystem") == "strict" and one(service, "PrivateDevices") == "yes"
    assert one(service, "MemoryDenyWriteExecute") == "yes" and one(service, "NoNewPrivileges") == "yes"
    assert one(service, "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert one(service, "UMask") == "0077"  # the state file holds the signed orders written ahead


def test_compose_runs_the_controller_on_what_it_mounts() -> None:
    images = REPO / "images"
    service = yaml.safe_load((images / "compose.yaml").read_text())["services"]["controller"]
    args = build_parser().parse_args(service["command"])
    assert args.handler.__name__ == "controller"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts[str(args.inventory)] == "./inventory.yaml"
    assert load_enrollment(images / "inventory.yaml") == {}  # valid as shipped: no device enrolled yet
    assert mounts[str(args.key)] == "../keys/registry.key"
    assert service["restart"] == "on-failure"  # a lost broker connection ends it, as under systemd
    state = next(path for path, source in mounts.items() if not source.startswith("."))
    assert str(args.db).startswith(state + "/")  # the state file lives in the named volume
    assert args.broker == "mqtt://mosquitto:1883" and {"mosquitto", "registry"} <= set(service["depends_on"])
    registry = yaml.safe_load((images / "compose.yaml").read_text())["services"]["registry"]
    assert args.registry == f"http://registry:{registry['command'][registry['command'].index('--port') + 1]}/"
