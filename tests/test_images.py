"""The container definitions: built and run where a container engine is available; everywhere, checked
against what they rely on: every file they copy or mount exists (or is one `registry keygen` writes),
every command they run parses with the real CLI, the default command serves a profile that runs as it
stands, and the health check passes against a real agent running that profile."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from agent.cli import build_parser
from agent.cli.registry import _default_key
from agent.config.profile import load_profile
from tests.helpers.broker import free_port

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def exec_form(rest: str) -> list[str]:
    return yaml.safe_load(rest)  # a JSON array is valid YAML


def healthcheck() -> list[str]:
    """The HEALTHCHECK's command, exec form."""
    steps = dict(dockerfile_instructions(IMAGES / "Dockerfile"))
    return exec_form(steps["HEALTHCHECK"].split(" CMD ", 1)[1])


def healthcheck_port() -> int:
    (url,) = [word for word in " ".join(healthcheck()).replace("'", " ").split() if word.startswith("http")]
    return urlsplit(url).port or 80


def default_profile() -> tuple[Path, str]:
    """(the file the image installs as its default profile, where it goes): the one CMD runs."""
    steps = dockerfile_instructions(IMAGES / "Dockerfile")
    (cmd,) = [exec_form(rest) for op, rest in steps if op == "CMD"]
    target = cmd[cmd.index("--profile") + 1]
    (source,) = [shlex.split(rest)[0] for op, rest in steps if op == "COPY" and shlex.split(rest)[-1] == target]
    return REPO / source, target


def compose() -> dict:
    return yaml.safe_load((IMAGES / "compose.yaml").read_text())


def test_dockerfile_copies_existing_files_and_runs_the_console_script() -> None:
    steps = dockerfile_instructions(IMAGES / "Dockerfile")
    for op, rest in steps:
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the build context"
    copied = {src for op, rest in steps if op == "COPY" for src in shlex.split(rest)[:-1]}
    license_files = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license-files"]
    assert set(license_files) <= copied, "the build needs the license files pyproject.toml names"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = [exec_form(rest) for op, rest in steps if op == "ENTRYPOINT"]
    (cmd,) = [exec_form(rest) for op, rest in steps if op == "CMD"]
    assert entry == ["edge-agent"] and "edge-agent" in scripts
    build_parser().parse_args(cmd)  # the default command is one the CLI accepts


def test_image_is_non_root_with_state_volume_and_healthz_check() -> None:
    steps = dict(dockerfile_instructions(IMAGES / "Dockerfile"))
    assert steps["USER"] == "edge-agent"
    assert exec_form(steps["VOLUME"]) == ["/var/lib/edge-agent"]
    assert "/healthz" in steps["HEALTHCHECK"] and healthcheck()[0] == "python"
    assert steps["FROM"].startswith("python:") and "slim" in steps["FROM"]
    assert steps["EXPOSE"] == str(healthcheck_port())


def test_the_default_command_serves_a_profile_that_runs_as_it_stands() -> None:
    """No demo variables, no broker, no registry, no file that is not in the image: it starts, serves
    /healthz where the health check asks, and waits for a profile to be mounted over it."""
    source, target = default_profile()
    assert source == IMAGES / "profile.yaml" and target == "/etc/edge-agent/profile.yaml"
    profile = load_profile(source, environ={}, files="all")
    assert profile.pipelines == () and profile.mqtt is None and profile.registry is None
    assert profile.device.id == "container" and str(profile.device.state_dir) == "/var/lib/edge-agent"
    assert profile.runtime.http is not None and profile.runtime.http.endswith(f":{healthcheck_port()}")
    named = load_profile(source, environ={"EDGE_DEVICE_ID": "porch-cam"})
    assert named.device.id == "porch-cam"


def test_the_health_check_passes_against_an_agent_running_the_default_profile(tmp_path: Path) -> None:
    """The image's profile and HEALTHCHECK command, outside a container: only the state folder and the
    port are this test's own."""
    source, _ = default_profile()
    port = free_port()
    text = source.read_text().replace("/var/lib/edge-agent", str(tmp_path / "state"))
    text = text.replace(f":{healthcheck_port()}", f":{port}")
    profile = tmp_path / "profile.yaml"
    profile.write_text(text)
    check = [
        sys.executable if word == "python" else word.replace(f":{healthcheck_port()}/", f":{port}/")
        for word in healthcheck()
    ]
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(check, capture_output=True).returncode != 0:
            assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.2)
    finally:
        agent.terminate()
        agent.wait(30)
        if agent.stderr is not None:
            agent.stderr.close()


def test_compose_builds_mounts_and_commands_exist(tmp_path: Path) -> None:
    """Every file compose mounts exists, is the registry folder (the user's to fill), or is a file
    `registry keygen --out keys/` writes: the key pair `registry publish --root registry/` signs with."""
    written = subprocess.run(
        [sys.executable, "-m", "agent", "registry", "keygen", "--out", str(tmp_path / "keys")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert written.returncode == 0, written.stderr
    keygen_writes = {Path("keys") / p.name for p in (tmp_path / "keys").iterdir()}
    assert _default_key(Path("registry")) == Path("keys/registry.key") and Path("keys/registry.key") in keygen_writes
    parser = build_parser()
    for name, service in compose()["services"].items():
        if "build" in service:
            context = (IMAGES / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
            parser.parse_args(service["command"])
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                path = (IMAGES / host).resolve()
                rel = path.relative_to(REPO)
                assert path.exists() or rel.parts[0] == "registry" or rel in keygen_writes, f"{name} mounts {host}"


def test_compose_profile_is_valid_and_names_what_compose_mounts() -> None:
    agent = compose()["services"]["agent"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in agent["volumes"]}
    profile_path = IMAGES / mounts[agent["command"][agent["command"].index("--profile") + 1]]
    loaded = load_profile(profile_path)
    assert loaded.mqtt is not None and loaded.mqtt.host == "mosquitto"
    assert loaded.registry is not None and str(loaded.registry.public_key) in mounts
    assert mounts[str(loaded.registry.public_key)] == "../keys/registry.pub"
    # The image's health check can pass: the status page listens where it asks, and compose keeps the check.
    assert loaded.runtime.http is not None and loaded.runtime.http.endswith(f":{healthcheck_port()}")
    assert "healthcheck" not in agent


def container_engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True).returncode == 0:
            return engine
    return None


@pytest.mark.slow
@pytest.mark.skipif(container_engine() is None, reason="no container engine here (docker or podman)")
def test_the_image_builds_and_becomes_healthy() -> None:
    engine = container_engine()
    assert engine is not None
    tag = f"edge-agent-test:{uuid.uuid4().hex[:8]}"
    built = subprocess.run(
        [engine, "build", "-f", "images/Dockerfile", "-t", tag, "."], cwd=REPO, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-4000:]
    name = f"edge-agent-test-{uuid.uuid4().hex[:8]}"
    try:
        started = subprocess.run(
            [engine, "run", "-d", "--name", name, "--health-interval", "2s", "--health-start-period", "0s", tag],
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 180
        while True:
            state = subprocess.run(
                [engine, "inspect", "--format", "{{json .State}}", name], capture_output=True, text=True
            )
            health = json.loads(state.stdout or "{}").get("Health", {}).get("Status")
            if health == "healthy":
                break
            assert health != "unhealthy" and time.monotonic() < deadline, state.stdout
            time.sleep(2)
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True)
