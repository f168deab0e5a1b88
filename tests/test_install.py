"""scripts/install.sh and scripts/uninstall.sh into a temporary root: every file they write, what they
would run on a real system, idempotency, and an installed unit that systemd-analyze accepts."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_systemd_unit import DROP_IN, assert_clean_but_for_old_systemd, parse_unit, verify

REPO = Path(__file__).resolve().parent.parent
VENV_PREFIX = "opt/edge-agent/venv/"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the scripts need bash")


def script(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    return out


def would_run(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.removeprefix("would run: ") for line in out.stdout.splitlines()]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under root: kind, mode, mtime and content digest (link target for links)."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                found[rel] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    st.st_mtime_ns,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
    return found


def files_outside_venv(root: Path) -> dict[str, int]:
    return {
        rel: entry[1] for rel, entry in snapshot(root).items() if entry[0] == "file" and not rel.startswith(VENV_PREFIX)
    }  # type: ignore[misc]


@dataclass
class Installed:
    root: Path
    source: Path
    first: subprocess.CompletedProcess[str]


def copy_source(target: Path) -> Path:
    """A still copy of the checkout: others edit agent/ while tests run, and the script must see one source."""
    for name in ("agent", "pyproject.toml", "README.md", "LICENSE"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target / name)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One real install (a new virtualenv, a wheel built from the checkout, installed without its
    dependencies to stay quick) that the tests below read or copy."""
    base = tmp_path_factory.mktemp("install")
    source = copy_source(base / "src")
    root = base / "root"
    first = script("install.sh", "--root", root, "--from", source, "--no-deps")
    assert first.returncode == 0, first.stderr
    return Installed(root, source, first)


def copy_root(installed: Installed, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    return root


def test_the_tree(installed: Installed) -> None:
    root = installed.root
    assert files_outside_venv(root) == {
        "etc/systemd/system/edge-agent.service": 0o644,
        "etc/systemd/system/edge-agent.service.d/restart-backoff.conf": 0o644,
        "etc/edge-agent/profile.yaml": 0o640,
        "etc/edge-agent/profile.schema.json": 0o644,
        "opt/edge-agent/.installed": 0o644,
        "opt/edge-agent/share/doc/systemd.md": 0o644,
    }
    assert (root / "etc/systemd/system/edge-agent.service").read_text() == (
        REPO / "systemd/edge-agent.service"
    ).read_text()
    assert (root / "etc/systemd/system/edge-agent.service.d/restart-backoff.conf").read_text() == DROP_IN.read_text()
    assert (root / "opt/edge-agent/share/doc/systemd.md").read_text() == (REPO / "docs/systemd.md").read_text()
    assert (root / "etc/edge-agent/profile.schema.json").read_bytes() == (
        REPO / "configs/profile.schema.json"
    ).read_bytes()
    assert (root / "opt/edge-agent/.installed").read_text().startswith("edge-agent source-sha256=")

    # The program the unit starts, pointing at the virtualenv where it will be on the device.
    program = root / "opt/edge-agent/venv/bin/edge-agent"
    assert os.access(program, os.X_OK)
    assert program.read_text().splitlines()[0] == "#!/opt/edge-agent/venv/bin/python"
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix != ".pyc":
            assert str(root) not in path.read_text(errors="replace"), f"{path} names the temporary root"
    python = root / "opt/edge-agent/venv/bin/python"
    where = subprocess.run(
        [python, "-I", "-c", "import agent; print(agent.__file__)"], capture_output=True, text=True, check=True
    )
    assert where.stdout.startswith(str(root / "opt/edge-agent/venv/lib/"))


def test_the_starter_profile_is_valid(installed: Installed) -> None:
    profile = installed.root / "etc/edge-agent/profile.yaml"
    assert "@DEVICE_ID@" not in profile.read_text()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(profile)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "0 pipeline(s)" in out.stdout, out.stdout + out.stderr


def test_what_it_would_run_on_a_real_system(installed: Installed) -> None:
    assert would_run(installed.first) == [
        "groupadd --system video  # if the group is missing",
        "groupadd --system render  # if the group is missing",
        "groupadd --system dialout  # if the group is missing",
        "useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home --shell /usr/sbin/nologin "
        "--comment edge-agent\\ daemon edge-agent  # if the user is missing",
        "chown root:edge-agent /etc/edge-agent/profile.yaml",
        "systemctl daemon-reload",
        "systemctl enable edge-agent.service",
        "systemctl restart edge-agent.service",
    ]


def test_the_installed_unit_verifies(installed: Installed, tmp_path: Path) -> None:
    unit = (installed.root / "etc/systemd/system/edge-agent.service").read_text()
    program = "/opt/edge-agent/venv/bin/edge-agent"
    out = verify(unit, tmp_path, executables={program: installed.root / program.lstrip("/")})
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    # With the restart drop-in install.sh put beside it, read by systemd from where it was installed.
    drop_ins = {p.name: p.read_text() for p in (installed.root / "etc/systemd/system/edge-agent.service.d").iterdir()}
    assert set(drop_ins) == {"restart-backoff.conf"}
    out = verify(unit, tmp_path / "with-drop-in", {program: installed.root / program.lstrip("/")}, drop_ins)
    assert out.returncode == 0, out.stdout + out.stderr
    assert_clean_but_for_old_systemd(out, "edge-agent.service.d/restart-backoff.conf")


def test_uninstall_keeps_a_drop_in_of_the_operator(installed: Installed, tmp_path: Path) -> None:
    """install.sh's drop-in goes with the unit; one made with `systemctl edit` stays without --purge."""
    root = copy_root(installed, tmp_path)
    mine = root / "etc/systemd/system/edge-agent.service.d/override.conf"
    mine.write_text("[Service]\nDeviceAllow=char-mydriver rw\n")
    out = script("uninstall.sh", "--root", root)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in mine.parent.iterdir()] == ["override.conf"]
    assert "removed /etc/systemd/system/edge-agent.service.d/restart-backoff.conf" in out.stderr


def test_a_second_run_changes_nothing(installed: Installed, tmp_path: Path) -> None:
    root = copy_root(installed, tmp_path)
    before = snapshot(root)
    again = script("install.sh", "--root", root, "--from", installed.source, "--no-deps")
    assert again.returncode == 0, again.stderr
    assert snapshot(root) == before
    assert "nothing changed" in again.stderr
    assert would_run(again)[-1] == "systemctl start edge-agent.service"  # running: left alone, not restarted


def test_an_existing_profile_is_kept(installed: Installed, tmp_path: Path) -> None:
    root = copy_root(installed, tmp_path)
    profile = root / "etc/edge-agent/profile.yaml"
    mine = "device: {id: porch-cam}\n"
    profile.write_text(mine)
    other = tmp_path / "other.yaml"
    other.write_text("device: {id: someone-else}\n")
    again = script(
        "install.sh", "--root", root, "--from", installed.source, "--no-deps", "--profile", other, "--no-start"
    )
    assert again.returncode == 0, again.stderr
    assert profile.read_text() == mine
    assert f"keeping the existing /etc/edge-agent/profile.yaml; {other} was not installed" in again.stderr
    assert not any(
        line.startswith("systemctl start") or line.startswith("systemctl restart") for line in would_run(again)
    )


def test_uninstall_keeps_the_profile_and_purge_removes_everything(installed: Installed, tmp_path: Path) -> None:
    root = copy_root(installed, tmp_path)
    (root / "var/lib/edge-agent/models").mkdir(parents=True)  # as the running service would leave it
    out = script("uninstall.sh", "--root", root)
    assert out.returncode == 0, out.stderr
    assert would_run(out) == ["systemctl disable --now edge-agent.service", "systemctl daemon-reload"]
    assert files_outside_venv(root) == {
        "etc/edge-agent/profile.yaml": 0o640,
        "etc/edge-agent/profile.schema.json": 0o644,
    }
    assert (root / "var/lib/edge-agent/models").is_dir() and not (root / "opt/edge-agent").exists()
    assert "kept /etc/edge-agent /var/lib/edge-agent" in out.stderr

    again = script("uninstall.sh", "--root", root)
    assert again.returncode == 0, again.stderr

    purged = script("uninstall.sh", "--root", root, "--purge")
    assert purged.returncode == 0, purged.stderr
    assert would_run(purged)[-1] == "userdel edge-agent  # if the user exists"
    assert [rel for rel, entry in snapshot(root).items() if entry[0] != "dir"] == []
    assert not (root / "etc/edge-agent").exists() and not (root / "var/lib/edge-agent").exists()


def test_uninstall_leaves_a_folder_it_did_not_make(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt/edge-agent").mkdir(parents=True)
    (root / "opt/edge-agent/notes.txt").write_text("mine")
    out = script("uninstall.sh", "--root", root)
    assert out.returncode == 0 and (root / "opt/edge-agent/notes.txt").exists()
    assert "left /opt/edge-agent alone" in out.stderr


def test_bad_usage(tmp_path: Path) -> None:
    for name in ("install.sh", "uninstall.sh"):
        out = script(name, "--frobnicate")
        assert out.returncode == 2 and "unknown option: --frobnicate" in out.stderr
        out = script(name, "--root", tmp_path, "--prefix", "relative/dir")
        assert out.returncode == 2 and "--prefix must be an absolute path" in out.stderr
    out = script("install.sh", "--root", tmp_path, "--from", tmp_path / "nothing-here")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert script("install.sh", "--help").stdout.startswith("usage: scripts/install.sh")
    out = script("install.sh", "--root", tmp_path, "--runtime", "tpu")
    assert out.returncode == 2 and "--runtime: unknown build 'tpu' (auto, cpu, openvino, cuda, jetson)" in out.stderr
    out = script("install.sh", "--root", tmp_path, "--no-deps", "--runtime", "auto")
    assert out.returncode == 2 and "--runtime auto needs the dependencies" in out.stderr


def test_a_build_without_wheels_for_this_cpu_is_refused_by_the_agents_plan(
    installed: Installed, tmp_path: Path
) -> None:
    root = copy_root(installed, tmp_path)
    build, arch = ("openvino", "x86_64") if platform.machine() == "aarch64" else ("jetson", "aarch64")
    out = script("install.sh", "--root", root, "--from", installed.source, "--no-deps", "--runtime", build)
    assert out.returncode == 2, out.stderr
    assert f"has wheels for {arch} only; this is {platform.machine()}" in out.stderr
    assert (root / "opt/edge-agent/.installed").read_text().endswith(" runtime=none\n")  # as it was


@pytest.mark.slow
def test_a_wheel_with_its_dependencies_under_another_prefix(installed: Installed, tmp_path: Path) -> None:
    """The whole path a device takes: a wheel, a virtualenv with every dependency from the package
    index (pip's cache makes repeats quick), the profile checked by the installed agent itself; then
    an upgrade to a new build."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(installed.source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("edge_agent-*.whl")
    profile = tmp_path / "gate.yaml"
    profile.write_text("device: {id: gate-cam-01, group: north-gate}\nhealth: {interval: 10s}\n")
    root = tmp_path / "root"
    out = script(
        "install.sh",
        "--root",
        root,
        "--from",
        wheel,
        "--prefix",
        "/srv/edge-agent",
        "--profile",
        profile,
        "--runtime",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    assert "and its dependencies" in out.stderr and "gate-cam-01, 0 pipeline(s)" in out.stderr
    assert "installing the onnxruntime build 'cpu' (onnxruntime" in out.stderr
    assert (root / "etc/edge-agent/profile.yaml").read_text() == profile.read_text()
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    service = parse_unit(unit)["Service"]
    assert (
        dict(service)["ExecStart"] == "/srv/edge-agent/venv/bin/edge-agent run --profile /etc/edge-agent/profile.yaml"
    )
    assert "/opt/edge-agent" not in unit
    program = "/srv/edge-agent/venv/bin/edge-agent"
    checked = verify(unit, tmp_path, executables={program: root / program.lstrip("/")})
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stderr
    python = root / "srv/edge-agent/venv/bin/python"
    version = subprocess.run([python, "-I", "-m", "agent", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("edge-agent "), version.stderr
    assert not (root / "opt").exists()

    # An upgrade: a new build of the same version is installed over the old one, and the service restarted.
    source = tmp_path / "src"
    shutil.copytree(installed.source, source)
    with open(source / "agent" / "__init__.py", "a") as f:
        f.write("\nRELEASE_NOTE = 'a new build'\n")
    shutil.rmtree(wheels)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("edge_agent-*.whl")
    again = script("install.sh", "--root", root, "--from", wheel, "--prefix", "/srv/edge-agent")
    assert again.returncode == 0, again.stderr
    assert "installing edge_agent-" in again.stderr and would_run(again)[-1] == "systemctl restart edge-agent.service"
    assert "installing the onnxruntime build 'cpu' (onnxruntime" in again.stderr  # recorded, and kept
    assert "the build the last install recorded" in again.stderr
    note = subprocess.run(
        [python, "-I", "-c", "import agent; print(agent.RELEASE_NOTE)"], capture_output=True, text=True
    )
    assert note.stdout == "a new build\n", note.stderr


# A Python warning printed by the build backend ("...: SetuptoolsDeprecationWarning: ...") and the "!!" frame
# setuptools draws around its deprecation notices. pip's own notes ("WARNING: Location ... is ignored", a
# machine's index configuration) and distutils' lower-case "warning: byte-compiling is disabled" (the
# environment's choice) are not about this project's metadata.
METADATA_WARNING = re.compile(r"\w+Warning: |^\s*!!\s*$")


@pytest.mark.slow
def test_installing_prints_no_warning_from_our_metadata(installed: Installed, tmp_path: Path) -> None:
    """A fresh virtualenv, the project built from source with the build backend pyproject.toml asks for
    (pip's isolated build), verbose so that the backend's warnings show: none of them may come from us."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        [venv / "bin/python", "-m", "pip", "install", "-v", "--no-deps", "--no-cache-dir", str(installed.source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "setuptools" in out.stdout + out.stderr  # the backend's own output is in what was read
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if METADATA_WARNING.search(line)]
    assert warnings == []

    wheels = tmp_path / "wheels"
    subprocess.run(
        [venv / "bin/python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(installed.source)],
        check=True,
        capture_output=True,
        env=env,
    )
    (wheel,) = wheels.glob("edge_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        dist_info = next(n.split("/")[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        license_text = archive.read(f"{dist_info}/licenses/LICENSE")
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines() and "Classifier: License" not in metadata
    assert any(line.startswith("Project-URL: Homepage, https://") for line in metadata.splitlines())
    assert license_text == (REPO / "LICENSE").read_bytes() and b"Apache License" in license_text


# ---- the onnxruntime build: chosen, recorded, kept by upgrades -------------------------------------


def openvino_wheels() -> Path:
    """scripts/openvino-venv.sh's cached wheels (onnxruntime-openvino, onnxruntime, their dependencies),
    so that these installs download nothing; a skip saying why there are none."""
    if platform.machine() != "x86_64":
        pytest.skip("onnxruntime-openvino has wheels for x86-64 only")
    out = subprocess.run(
        [str(REPO / "scripts" / "openvino-venv.sh"), "--wheels"], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        pytest.skip(f"no onnxruntime-openvino wheels: {out.stderr.strip().splitlines()[-1:]}")
    return Path(out.stdout.strip())


def builds_in(root: Path) -> dict[str, str]:
    """The onnxruntime distributions in the installed virtualenv itself, and the build install.sh recorded
    as the installed agent reads it."""
    python = root / "opt/edge-agent/venv/bin/python"
    code = (
        "import json; from agent.cli.probe import installed_distributions as d, recorded_build as r; "
        "print(json.dumps({**dict(d()), 'recorded': r()}))"
    )
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def providers_in(root: Path) -> list[str]:
    python = root / "opt/edge-agent/venv/bin/python"
    code = "import onnxruntime as o; print(' '.join(o.get_available_providers()))"
    return subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.slow
def test_runtime_cpu_then_openvino_and_an_upgrade_keeps_the_build(installed: Installed, tmp_path: Path) -> None:
    """--runtime swaps one build for the other in the virtualenv, records it, and a later install that
    names none (an upgrade) installs the same build again."""
    wheels = openvino_wheels()
    root = copy_root(installed, tmp_path)
    common = ("--root", root, "--no-deps", "--wheels", wheels)

    cpu = script("install.sh", *common, "--from", installed.source, "--runtime", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    found = builds_in(root)
    assert found.keys() == {"onnxruntime", "recorded"} and found["recorded"] == "cpu"
    assert "OpenVINOExecutionProvider" not in providers_in(root)

    openvino = script("install.sh", *common, "--from", installed.source, "--runtime", "openvino")
    assert openvino.returncode == 0, openvino.stderr
    assert "removing onnxruntime: one onnxruntime build per virtualenv" in openvino.stderr
    found = builds_in(root)
    assert found.keys() == {"onnxruntime-openvino", "recorded"} and found["recorded"] == "openvino"
    assert providers_in(root)[:1] == ["OpenVINOExecutionProvider"]
    assert (root / "opt/edge-agent/.installed").read_text().endswith(" deps=0 runtime=openvino\n")

    # An upgrade: a new build of the agent, no --runtime.
    source = tmp_path / "src"
    shutil.copytree(installed.source, source)
    with open(source / "agent" / "__init__.py", "a") as f:
        f.write("\nRELEASE_NOTE = 'a new build'\n")
    upgrade = script("install.sh", *common, "--from", source)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "installing the onnxruntime build 'openvino' (onnxruntime-openvino" in upgrade.stderr
    assert "the build the last install recorded" in upgrade.stderr
    assert builds_in(root).keys() == {"onnxruntime-openvino", "recorded"}
    assert providers_in(root)[:1] == ["OpenVINOExecutionProvider"]
    python = root / "opt/edge-agent/venv/bin/python"
    note = subprocess.run(
        [python, "-I", "-c", "import agent; print(agent.RELEASE_NOTE)"], capture_output=True, text=True
    )
    assert note.stdout == "a new build\n", note.stderr

    again = script("install.sh", *common, "--from", source)
    assert again.returncode == 0, again.stderr
    assert "installed from the same source already (onnxruntime build: openvino)" in again.stderr
    assert "nothing changed" in again.stderr
