"""Hostile profiles (issue 17, items 6 and 8, and the profile part of "at least 100 generated bad inputs"):
YAML bombs, recursive aliases, files `run` cannot use, and generated inputs of every kind of wrong
(depth, size, encoding, types, names). Each ends in `edit-agent check`'s documented refusal, exit 2 with
`FILE:LINE: key: message` lines, within a second, without a traceback; a running agent keeps serving.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.cli import check
from agent.config.yamldoc import MAX_EXPANDED_NODES
from agent.models.signing import generate_keypair
from tests.helpers.daemon_proc import sensor_csv
from tests.helpers.models import linear_model, save
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+): (?P<rest>.+)$")

# Ten lines, about 1.1 KB: each level refers to the one before nine times, 9**9 strings once expanded.
BILLION_LAUGHS = "\n".join(
    ['laughs0: &laughs0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"laughs{i}: &laughs{i} [" + ", ".join([f"*laughs{i - 1}"] * 9) + "]" for i in range(1, 10)]
)


def check_in_process(path: Path, capsys: pytest.CaptureFixture[str], no_files: bool = False) -> tuple[int, str, float]:
    """`edge-agent check FILE` in this process (fast): exit code, stderr, CPU seconds taken (the work a
    hostile file costs, which a bomb inflates; the wall clock of a shared, busy machine adds noise)."""
    capsys.readouterr()
    started = time.process_time()
    code = check.run(argparse.Namespace(files=[str(path)], schema=False, quiet=True, no_files=no_files))
    took = time.process_time() - started
    return code, capsys.readouterr().err, took


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_billion_laughs_is_refused_in_well_under_a_second_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS + "\n")
    assert 1000 <= bomb.stat().st_size <= 1200
    code, err, took = check_in_process(bomb, capsys)
    assert code == 2 and took < 0.5, took
    assert err == (
        f"{bomb}:5: YAML syntax: aliases expand this node to more than {MAX_EXPANDED_NODES} nodes (nested aliases, "
        "a 'billion laughs'); write the values out or use fewer aliases\n"
    )
    ran = cli("check", bomb)  # the CLI a user types: the same line, exit 2, no traceback
    assert (ran.returncode, ran.stderr) == (2, err)


def test_a_recursive_alias_is_a_located_error_not_a_recursion_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "rec.yaml"
    profile.write_text("device: {id: d}\nx: &a [*a]\n")
    code, err, _ = check_in_process(profile, capsys)
    assert (code, err) == (
        2,
        f"{profile}:2: YAML syntax: recursive alias: the node anchored on this line contains itself\n",
    )
    ran = cli("run", "--profile", profile)
    assert ran.returncode == 2 and "RecursionError" not in ran.stderr and "Traceback" not in ran.stderr
    assert f"{profile}:2: YAML syntax: recursive alias" in ran.stderr


def replace_profile(profile: Path, kind: str) -> str:
    """Put something hostile where the profile was; the line its refusal logs."""
    profile.unlink()
    if kind == "bomb":
        profile.write_text(BILLION_LAUGHS + "\n")
        return f"{profile}:5: YAML syntax: aliases expand this node"
    if kind == "fifo":  # opening it to read blocked the daemon's loop forever (SIGTERM too)
        os.mkfifo(profile)
        return f"{profile}:0: cannot read: a FIFO, not a regular file"
    if kind == "dev-zero":  # read whole: memory until the OOM killer
        profile.symlink_to("/dev/zero")
        return f"{profile}:0: cannot read: a device, not a regular file"
    with profile.open("wb") as f:  # 3 GiB, sparse: read whole (6 GiB of RSS, 14 s) before the bound was checked
        f.truncate(3 << 30)
    return f"{profile}:1: YAML syntax: larger than 1048576 bytes"


@pytest.mark.parametrize("kind", ["bomb", "fifo", "dev-zero", "huge"])
def test_sighup_with_a_hostile_profile_is_refused_and_the_agent_keeps_serving(tmp_path: Path, kind: str) -> None:
    """`run`'s reload (SIGHUP, and the `reload` command through the same Daemon.reload) reads the profile
    with the same loader: whatever replaced it is a `profile.invalid` event within a second or two, results
    go on, and SIGTERM still stops the agent."""
    model = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    profile = tmp_path / "profile.yaml"
    good = json.dumps(
        {
            "device": {"id": "d", "state_dir": str(tmp_path / "state")},
            "pipelines": [
                {
                    "name": "p",
                    "model": str(model),
                    "source": {"type": "csv", "path": str(sensor_csv(tmp_path / "s.csv")), "rate": 200},
                }
            ],
        }
    )
    profile.write_text(good)
    log = tmp_path / "agent.log"
    out = tmp_path / "results.jsonl"
    with log.open("wb") as err, out.open("wb") as stdout:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--profile", str(profile)], stdout=stdout, stderr=err, cwd=REPO
        )
    try:
        assert wait_for(lambda: out.stat().st_size > 1000, 60), log.read_text()
        line = replace_profile(profile, kind)
        agent.send_signal(signal.SIGHUP)
        sent = time.monotonic()
        refused = wait_for(lambda: "event type=profile.invalid" in log.read_text(), 10)
        assert refused and time.monotonic() - sent < 3, log.read_text()[-2000:]
        assert line in log.read_text()
        size = out.stat().st_size
        assert wait_for(lambda: out.stat().st_size > size + 1000, 10)  # still serving
        assert agent.poll() is None and "Traceback" not in log.read_text()
        agent.terminate()
        assert agent.wait(20) == 0, log.read_text()[-2000:]
    finally:
        agent.kill()
        agent.wait(10)


# -- item 8: what `run` needs from the file system ------------------------------------------------


@pytest.fixture
def runnable(tmp_path: Path) -> dict[str, Path]:
    generate_keypair(tmp_path / "keys")
    return {"key": tmp_path / "keys/registry.pub", "model": save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")}


def profile_text(state_dir: Path, key: Path, model: Path) -> str:
    return (
        f"device: {{id: d, state_dir: {state_dir}}}\n"
        f"registry: {{url: 'http://127.0.0.1:9/', public_key: {key}}}\n"
        f"pipelines:\n  - {{name: p, model: {model}, source: {{type: synthetic}}}}\n"
    )


def test_check_refuses_what_run_cannot_use_with_located_lines(
    tmp_path: Path, runnable: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text(profile_text(tmp_path / "state", runnable["key"], runnable["model"]))
    assert check_in_process(ok, capsys)[0] == 0
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyKeyKey user@host\n")
    a_file = tmp_path / "state-is-a-file"
    a_file.write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text(profile_text(a_file, not_pem, tmp_path / "gone.onnx"))
    code, err, took = check_in_process(bad, capsys)
    assert code == 2 and took < 1
    assert err.splitlines() == [
        f"{bad}:1: device.state_dir: not a directory: {a_file} (models, outbox and caches live here)",
        f"{bad}:2: registry.public_key: {not_pem}: no PEM public key found (expected the registry's public key as PEM)",
        f"{bad}:4: pipelines[0].model: no such file: {tmp_path / 'gone.onnx'} (the model file)",
    ]
    # `run` refuses the same way (exit 2, located lines), where it failed with a bare FileNotFoundError.
    ran = cli("run", "--profile", bad)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr and "FileNotFoundError" not in ran.stderr
    assert f"{bad}:1: device.state_dir: not a directory" in ran.stderr
    assert f"{bad}:2: registry.public_key: {not_pem}: no PEM public key found" in ran.stderr


def test_check_refuses_a_pem_that_is_not_an_ed25519_public_key(
    tmp_path: Path, runnable: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "keys/registry.key"  # a private key where the public one belongs
    rsa_like = tmp_path / "broken.pem"
    rsa_like.write_text("-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    for key, says in ((private, "no PEM public key found"), (rsa_like, "a PEM block is not a public key")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(profile_text(tmp_path / "state", key, runnable["model"]))
        code, err, _ = check_in_process(bad, capsys)
        assert code == 2 and f"{bad}:2: registry.public_key: {key}: {says}" in err, err


# -- generated hostile profiles ----------------------------------------------------------------------

BASE = "device: {id: d, state_dir: STATE}\npipelines:\n  - {name: p, model: MODEL, source: {type: synthetic}}\n"


def hostile_profiles() -> Iterator[tuple[str, bytes]]:
    """(name, file content): over 100 profiles, each wrong in one way."""
    # depth
    for depth in (65, 100, 999, 5000, 100_000):
        yield f"depth-list-{depth}", ("x: " + "[" * depth + "]" * depth + "\n").encode()
        yield f"depth-map-{depth}", ("x: " + "{a: " * depth + "1" + "}" * depth + "\n").encode()
    yield "depth-block", ("".join("  " * i + f"k{i}:\n" for i in range(80)) + "  " * 80 + "v: 1\n").encode()
    # aliases
    for width, levels in ((9, 9), (10, 6), (2, 30), (100, 3), (4, 12)):
        lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        yield f"bomb-{width}x{levels}", ("\n".join(lines) + "\n").encode()
    yield (
        "bomb-merge",
        b"a: &a {x: 1}\n"
        + b"".join(
            f"b{i}: &b{i} {{<<: *{'a' if i == 0 else f'b{i - 1}'}, k{i}: [*a, *a]}}\n".encode() for i in range(40)
        ),
    )
    for text in ("x: &a [*a]", "x: &a {k: *a}", "x: &a [1, [2, *a]]", "device: &a {id: *a}", "x: &a {<<: *a}"):
        yield f"recursive-{text}", (text + "\n").encode()
    yield "undefined-alias", b"device: *nope\n"
    # size
    yield "huge-file", b"# " + b"x" * (2 << 20) + b"\n"
    yield "huge-string", b"device: {id: '" + b"a" * 500_000 + b"'}\n"
    yield "many-keys", b"".join(b"k%d: 1\n" % i for i in range(20_000))
    yield "long-key", b"k" * 200_000 + b": 1\n"
    yield "many-pipelines", b"device: {id: d}\npipelines:\n" + b"".join(b"  - {name: p%d}\n" % i for i in range(3000))
    yield "huge-int", b"device: {id: d}\nhealth: {interval: " + b"9" * 5000 + b"}\n"
    # encoding
    yield "latin1", "device: {id: café}\n".encode("latin-1")
    yield "utf16", "device: {id: d}\n".encode("utf-16")
    yield "nul-bytes", b"device: {id: d\x00}\n"
    yield "binary", bytes(range(256)) * 8
    yield "bom-then-garbage", b"\xef\xbb\xbf\xff\xfe: x\n"
    yield "control-chars", b"device: {id: \x07\x1b[31m}\n"
    yield "surrogate-escape", b'device: {id: "\\ud800"}\n'
    yield "tabs", b"device:\n\tid: d\n"
    yield "empty", b""
    yield "only-comment", b"# nothing\n"
    yield "only-spaces", b"   \n\n"
    yield "multi-doc", b"device: {id: d}\n---\ndevice: {id: e}\n"
    yield "unterminated", b"device: {id: 'd\n"
    yield "bad-indent", b"device:\n  id: d\n group: g\n"
    # types
    for section in ("device", "mqtt", "registry", "runtime", "health", "pipelines"):
        for value in ("[1, 2]", "42", "'text'", "true", ".nan", "-.inf", "!!binary aGVsbG8=", "{nope: 1}"):
            yield f"type-{section}-{value}", f"device: {{id: d}}\n{section}: {value}\n".encode()
    for key, value in (
        ("health", "{interval: -1s}"),
        ("health", "{interval: .nan}"),
        ("health", "{interval: 1e400}"),
        ("health", "{interval: 99999999999999999999d}"),
        ("mqtt", "{url: 'mqtt://[::1'}"),
        ("mqtt", "{url: 'mqtt://h:99999'}"),
        ("mqtt", "{url: 'ftp://h'}"),
        ("mqtt", "{url: mqtt://h, outbox: {max_bytes: 1}}"),
        ("mqtt", "{url: mqtt://h, outbox: {max_bytes: 1e400}}"),
        ("mqtt", "{url: mqtt://h, outbox: {max_bytes: 99999999999999999999999TiB}}"),
        ("registry", "{url: 'http://', public_key: k}"),
    ):
        yield f"value-{key}-{value}", f"device: {{id: d}}\n{key}: {value}\n".encode()
    yield "tag-python", b"device: !!python/object/apply:os.system ['true']\n"
    yield "tag-custom", b"device: !mine {id: d}\n"
    yield "key-list", b"? [a, b]\n: 1\n"
    yield "key-map", b"? {a: 1}\n: 1\n"
    yield "key-null", b"~: 1\ndevice: {id: d}\n"
    yield "key-int", b"1: x\ndevice: {id: d}\n"
    yield "duplicate-keys", b"device: {id: d}\ndevice: {id: e}\n"
    yield "top-list", b"- device\n- pipelines\n"
    yield "top-scalar", b"just text\n"
    # names
    for name in (
        "../../../etc/x",
        "/abs",
        "a/b",
        "edge/#",
        "+",
        "",
        "a" * 65,
        "a" * 100_000,
        ".hidden",
        "-dash",
        "new\\nline",
        "tab\\tname",
        "ünïcode",
        "😀",
        "cmd",
        "fleet",
        "${NOPE}",
        "a b",
        "NUL\\0",
        "%2e%2e",
    ):
        escaped = json.dumps(name)
        yield f"device-id-{name[:20]}", f"device: {{id: {escaped}}}\n".encode()
        yield (
            f"pipeline-name-{name[:20]}",
            (
                f"device: {{id: d}}\npipelines:\n  - {{name: {escaped}, model: m.onnx, source: {{type: synthetic}}}}\n"
            ).encode(),
        )


def test_at_least_100_hostile_profiles_each_end_in_a_located_refusal_within_a_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = list(hostile_profiles())
    assert len(cases) >= 100, len(cases)
    slowest = (0.0, "")
    for i, (name, content) in enumerate(cases):
        path = tmp_path / f"p{i}.yaml"
        path.write_bytes(content)
        code, err, took = check_in_process(path, capsys)  # an exception would fail the test here
        assert code == 2, f"{name}: accepted"
        assert took < 1.0, f"{name}: {took:.2f} s"
        slowest = max(slowest, (took, name))
        lines = err.splitlines()
        assert 0 < len(lines) <= 100, f"{name}: {len(lines)} lines"  # the first problems and a count
        for line in lines:
            match = LINE.match(line)
            assert match and match["file"] == str(path), f"{name}: not FILE:LINE: {line[:200]!r}"
            assert len(line) < 2000, f"{name}: an unbounded message ({len(line)} chars)"
            assert "Traceback" not in line and "Error:" not in line.split(": ", 2)[-1][:12], f"{name}: {line[:200]}"
    print(f"{len(cases)} hostile profiles; slowest {slowest[1]!r} {slowest[0] * 1000:.0f} ms")


def test_a_profile_with_thousands_of_problems_prints_the_first_and_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "many.yaml"
    profile.write_text("device: {id: d}\n" + "".join(f"unknown{i}: 1\n" for i in range(3000)))
    code, err, took = check_in_process(profile, capsys)
    lines = err.splitlines()
    assert code == 2 and took < 1 and len(lines) == 100
    assert lines[0].startswith(f"{profile}:2: unknown0: unknown key")
    assert lines[-1] == f"{profile}:101: ... and 2901 more problems"


@pytest.mark.parametrize(
    ("source", "preprocess", "key", "words"),
    [
        ("{type: synthetic}", "{resize: [100000, 100000]}", "pipelines[0].preprocess", "resize must be two sizes"),
        ("{type: synthetic}", "{resize: [640, 0]}", "pipelines[0].preprocess", "resize must be two sizes"),
        ("{type: csv, path: s.csv}", "{window: 1000000000}", "pipelines[0].preprocess.window", "1048576"),
        ("{type: csv, path: s.csv}", "{window: 8, hop: 1000000000}", "pipelines[0].preprocess.hop", "1048576"),
        ("{type: audio, path: a.wav, window: 1000000000}", "{}", "pipelines[0].source.window", "1048576"),
        ("{type: audio, path: a.wav, context: 1000000000}", "{}", "pipelines[0].source.context", "1048576"),
        ("{type: camera, device: '0', width: 100000}", "{}", "pipelines[0].source.width", "8192"),
        ("{type: synthetic, height: 100000}", "{}", "pipelines[0].source.height", "8192"),
    ],
)
def test_sizes_a_profile_would_have_the_device_allocate_are_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, preprocess: str, key: str, words: str
) -> None:
    """A window of a billion samples fills memory one sample at a time; a frame side of 100,000 pixels is
    30 GB at its first resize. Both are refused where the profile says them; the same profile with sane
    sizes passes, so the refusal is the bound's."""

    def profile(src: str, pre: str) -> Path:
        path = tmp_path / "p.yaml"
        path.write_text(
            f"device: {{id: d}}\npipelines:\n  - {{name: p, model: m.onnx, source: {src}, preprocess: {pre}}}\n"
        )
        return path

    code, err, _ = check_in_process(profile(source, preprocess), capsys, no_files=True)
    assert code == 2, err
    (line,) = err.splitlines()
    assert LINE.match(line) and f": {key}: " in line and words in line, line
    sane = source.replace("1000000000", "512").replace("100000", "640")
    sane_pre = preprocess.replace("100000, 100000", "640, 480").replace("640, 0", "640, 480")
    assert check_in_process(profile(sane, sane_pre.replace("1000000000", "16")), capsys, no_files=True)[0] == 0


def test_secret_files_that_are_not_a_small_text_file_are_refused_at_once_naming_what_they_are(tmp_path: Path) -> None:
    """mqtt.password_file and endpoint.token_file: a FIFO blocked the connection (or the endpoint's start) for
    ever, /dev/zero never ended, and bytes that are not UTF-8 ended the connection thread with a traceback."""
    import threading

    from agent.config.endpoint import EndpointConfig
    from agent.config.profile import MqttConfig
    from agent.service.endpoint.server import EndpointError, load_token

    fifo = tmp_path / "secret.fifo"
    os.mkfifo(fifo)
    latin1 = tmp_path / "latin1"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (1 << 20))
    cases = {
        fifo: "a FIFO, not a regular file",
        Path("/dev/zero"): "a device, not a regular file",
        latin1: "not UTF-8 text (byte 3)",
        huge: "larger than 65536 bytes",
    }
    for path, words in cases.items():
        said: list[str] = []

        def read(p: Path = path, out: list[str] = said) -> None:
            with pytest.raises(OSError) as mqtt:
                MqttConfig(url="mqtt://h", username="u", password_file=p).secret()
            with pytest.raises(EndpointError) as endpoint:
                load_token(EndpointConfig(enabled=True, token_file=p), {})
            out.extend([str(mqtt.value), str(endpoint.value)])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(5)
        assert len(said) == 2 and words in said[0], (path, said)
        assert said[1].startswith(f"endpoint.token_file: cannot read {path}: ") and words in said[1], said
    good = tmp_path / "good"
    good.write_text("s3cret\n")
    assert MqttConfig(url="mqtt://h", username="u", password_file=good).secret() == "s3cret"
