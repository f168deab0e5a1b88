"""A start whose profile validated before, unchanged, takes it from its snapshot in the cache folder without
parsing its YAML or importing pydantic; any change to the document, its environment or the code validates it
again, and a damaged or planted snapshot is never trusted."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.config import snapshot, validate
from agent.config.errors import ProfileError
from agent.config.profile import Profile, load_profile
from agent.util import redact
from tests.helpers.models import save, unary_model
from tests.helpers.profiles import one_pipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The agent's cache folder, this test's own."""
    monkeypatch.setenv("EDGE_AGENT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / snapshot.FOLDER


def test_the_snapshot_goes_to_the_agents_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = tmp_path / "p.yaml"
    name = snapshot.location(profile)
    assert name is not None and name.parent == tmp_path / "cache" / snapshot.FOLDER  # EDGE_AGENT_CACHE first
    monkeypatch.delenv("EDGE_AGENT_CACHE")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/edge-agent")  # the service: systemd's CacheDirectory=
    assert snapshot.location(profile) == Path("/var/cache/edge-agent") / snapshot.FOLDER / name.name
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert snapshot.location(profile) == tmp_path / "xdg" / "edge-agent" / snapshot.FOLDER / name.name


def profile_file(tmp_path: Path, **pipeline: object) -> Path:
    model = save(unary_model("Relu", shape=("N", 3, 24, 32)), tmp_path / "m.onnx")
    source = {"type": "synthetic", "width": 32, "height": 24, "frames": 2, "fps": 1000}
    return one_pipeline(tmp_path, model, source, **pipeline)


def refuse_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> object:
        raise AssertionError("the profile was validated again")

    monkeypatch.setattr(validate, "validate", refused)


@pytest.mark.arm64
def test_an_unchanged_profile_comes_from_its_snapshot_and_any_change_validates_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    path = profile_file(tmp_path, preprocess={"resize": [32, 24], "scale": "${SCALE}"})
    env = {"SCALE": "0.5", "OTHER": "1"}
    first = load_profile(path, environ=env, snapshot=True)
    assert [f.name for f in cache.iterdir()] == [snapshot.location(path.resolve()).name]  # type: ignore[union-attr]
    with monkeypatch.context() as m:
        refuse_validation(m)
        assert load_profile(path, environ={**env, "OTHER": "2"}, snapshot=True) == first  # a variable not named
        with pytest.raises(AssertionError, match="validated again"):  # another value from the environment
            load_profile(path, environ={**env, "SCALE": "0.25"}, snapshot=True)
        with pytest.raises(AssertionError, match="validated again"):  # no snapshot asked for: `edge-agent check`
            load_profile(path, environ=env)
        model = Path(first.pipelines[0].model)
        model.rename(model.with_suffix(".gone"))  # a file it names is gone: checked, and located
        with pytest.raises(AssertionError, match="validated again"):
            load_profile(path, environ=env, snapshot=True, files="all")
        model.with_suffix(".gone").rename(model)
    # An edit that breaks the profile is refused, located, although a snapshot of the old one is kept.
    doc = json.loads(path.read_text())
    doc["pipelines"][0]["preprocess"]["scale"] = "fast"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"pipelines\[0\]\.preprocess\.scale: expected a number, got 'fast'"):
        load_profile(path, environ=env, snapshot=True)


def test_a_secret_from_the_environment_is_masked_by_a_start_from_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("device: {id: d, state_dir: state}\nmqtt: {url: 'mqtt://h', username: u, password: '${MQTT_PW}'}\n")
    load_profile(path, environ={"MQTT_PW": "s3cret-one"}, snapshot=True)
    with monkeypatch.context() as m:
        refuse_validation(m)
        m.setattr(redact, "_remembered", set())  # a new process: nothing remembered yet
        profile = load_profile(path, environ={"MQTT_PW": "s3cret-one"}, snapshot=True)
        assert profile.mqtt is not None and profile.mqtt.secret() == "s3cret-one"
        assert redact.text("connect failed: s3cret-one") == f"connect failed: {redact.MASK}"


def test_a_snapshot_of_other_code_or_damaged_or_planted_is_not_used(tmp_path: Path) -> None:
    path = profile_file(tmp_path)
    good = load_profile(path, snapshot=True)
    kept = snapshot.location(path.resolve())
    assert kept is not None
    head, _, body = kept.read_bytes().partition(b"\n")
    header = json.loads(head)
    key = header["key"]
    assert snapshot.load(kept, key, Profile) == (good, [])

    header["code"][0][2] += 1  # one module changed since (a new release, an edited checkout)
    kept.write_bytes(json.dumps(header).encode() + b"\n" + body)
    assert snapshot.load(kept, key, Profile) is None

    kept.write_bytes(head + b"\n" + body[: len(body) // 2])  # cut short
    assert snapshot.load(kept, key, Profile) is None
    kept.write_bytes(b"\x00" * 100)
    assert snapshot.load(kept, key, Profile) is None

    # A planted snapshot that would run code when unpickled: refused before anything runs.
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> tuple[object, ...]:
            return (subprocess.call, (["touch", str(marker)],))

    for planted in (Exploit(), {"profile": good, "then": Exploit()}):
        kept.write_bytes(head + b"\n" + pickle.dumps(planted, protocol=5))
        assert snapshot.load(kept, key, Profile) is None
    assert not marker.exists()
    # A snapshot of something else than a profile, made of the same classes, is not one.
    kept.write_bytes(head + b"\n" + pickle.dumps(good.device, protocol=5))
    assert snapshot.load(kept, key, Profile) is None


def test_a_fifo_in_the_snapshots_place_does_not_hold_up_the_start(tmp_path: Path) -> None:
    path = profile_file(tmp_path)
    kept = snapshot.location(path.resolve())
    assert kept is not None
    kept.parent.mkdir(parents=True)
    os.mkfifo(kept)
    loaded: list[Profile] = []
    reader = threading.Thread(target=lambda: loaded.append(load_profile(path, snapshot=True)), daemon=True)
    reader.start()
    reader.join(20)
    assert loaded, "a FIFO where the snapshot goes held up the start"
    assert snapshot.load(kept, json.loads(kept.read_bytes().partition(b"\n")[0])["key"], Profile) == (loaded[0], [])


def test_a_restart_takes_the_snapshot_and_neither_parses_yaml_nor_loads_the_validator(
    tmp_path: Path, cache: Path
) -> None:
    path = profile_file(tmp_path, preprocess={"resize": [32, 24], "scale": 0.004})
    cmd = [sys.executable, "-X", "importtime", "-m", "agent", "run", "--profile", str(path)]
    runs = [
        subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=dict(os.environ))
        for _ in range(2)
    ]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
        assert [json.loads(line)["source_seq"] for line in done.stdout.splitlines()] == [0, 1]
    imported = [{line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line} for r in runs]
    assert {"agent.config.validate", "yaml"} <= imported[0]
    assert not {"agent.config.validate", "yaml"} & imported[1]  # (pydantic comes after the first result)
    assert len(list(cache.iterdir())) == 1
