"""`edge-agent registry ...` and `edge-agent models ...` as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from agent.device.onnxproto import AI_ONNX, identity_model
from agent.util.names import NAME_WORDS, VERSION_WORDS
from tests.helpers.faulty_models import nan_model, sequence_model, zipmap_classifier
from tests.helpers.registry import start_cli_server

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def tiny(path: Path, opset: int = 13, doc: bytes = b"") -> Path:
    path.write_bytes(identity_model(8, {AI_ONNX: opset}, doc=doc))
    return path


def pull(url: str, keys: Path, model: str, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`models pull` of `model` from the registry at `url` into `state`."""
    return cli(
        "models", "pull", model, "--registry", url, "--public-key", keys / "registry.pub", "--state-dir", state, *extra
    )


def publish(root: Path, model: str, file: Path, keys: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`registry publish` of `file` as `model` 1.0.0."""
    return cli(
        "registry",
        "publish",
        "--root",
        root,
        "--model",
        model,
        "--version",
        "1.0.0",
        "--file",
        file,
        "--key",
        keys / "registry.key",
        *extra,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    out = cli("registry", "keygen", "--out", folder)
    assert out.returncode == 0, out.stderr
    assert "key id" in out.stdout and (folder / "registry.key").exists() and (folder / "registry.pub").exists()
    again = cli("registry", "keygen", "--out", folder)
    assert again.returncode == 2 and again.stderr.strip().endswith("exists; keys are never overwritten")
    assert len(again.stderr.strip().splitlines()) == 1
    return folder


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "registry"
    root.mkdir()
    proc, url = start_cli_server(root, cwd=REPO)
    yield root, url
    proc.terminate()
    proc.wait(10)


def test_publish_serve_pull_list_rollback_inspect(keys: Path, served: tuple[Path, str], tmp_path: Path) -> None:
    root, url = served
    key, pub, state = keys / "registry.key", keys / "registry.pub", tmp_path / "state"
    out = cli(
        "registry",
        "publish",
        "--root",
        root,
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--file",
        tiny(tmp_path / "a.onnx"),
        "--key",
        key,
        "--channel",
        "stable",
    )
    assert out.returncode == 0, out.stderr
    assert "m 1.0.0 variant fp32: fp32, IR 8, ai.onnx 13" in out.stdout and "channel stable -> 1.0.0" in out.stdout

    pull = cli("models", "pull", "m", "--registry", url, "--public-key", pub, "--state-dir", state)
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.strip() == "m 1.0.0 activated (variant fp32, tested on CPUExecutionProvider; previous -)"
    assert "m: 100% of" in pull.stderr and "downloading: m 1.0.0 variant fp32" in pull.stderr

    cli(
        "registry",
        "publish",
        "--root",
        root,
        "--model",
        "m",
        "--version",
        "1.1.0",
        "--file",
        tiny(tmp_path / "b.onnx", doc=b"v2"),
        "--key",
        key,
        "--channel",
        "stable",
    )
    profile = tmp_path / "device.yaml"
    profile.write_text(f"device: {{id: cam-01, state_dir: {state}}}\nregistry: {{url: '{url}', public_key: {pub}}}\n")
    pull = cli("models", "pull", "m", "--profile", profile, "--json")
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout) | {} == {
        **json.loads(pull.stdout),
        "status": "activated",
        "version": "1.1.0",
        "previous": "1.0.0",
    }
    assert cli("models", "pull", "m", "--profile", profile).stdout.strip() == "m 1.1.0 is already active (variant fp32)"

    listing = cli("models", "list", "--state-dir", state, "--verify")
    assert listing.returncode == 0, listing.stderr
    assert (
        listing.stdout.startswith("m: active 1.1.0 (fp32, sha256:")
        and "previous 1.0.0, on disk: 1.0.0, 1.1.0" in listing.stdout
    )

    back = cli("models", "rollback", "m", "--state-dir", state)
    assert back.returncode == 0 and back.stdout.strip() == "m: 1.1.0 -> 1.0.0 (variant fp32); 1.1.0 is held"
    listed = json.loads(cli("models", "list", "--profile", profile, "--json").stdout)[0]
    assert listed["active"] == "1.0.0" and [h["version"] for h in listed["held"]] == ["1.1.0"]
    assert "held: 1.1.0 since 20" in cli("models", "list", "--state-dir", state).stdout
    # A second rollback never toggles forward to the version the first one left.
    again = cli("models", "rollback", "m", "--state-dir", state)
    assert again.returncode == 1 and "m has no earlier version to roll back to (active: 1.0.0" in again.stderr
    forward = cli("models", "rollback", "m", "--version", "1.1.0", "--state-dir", state)
    assert forward.stdout.strip() == "m: 1.0.0 -> 1.1.0 (variant fp32); 1.0.0 is held", forward.stderr
    cli("models", "rollback", "m", "--version", "1.0.0", "--state-dir", state)

    inspect = cli("models", "inspect", "m", "--state-dir", state)
    assert inspect.returncode == 0, inspect.stderr
    lines = inspect.stdout.splitlines()
    assert lines[0].startswith("m 1.0.0 (variant fp32, fp32): ")
    assert lines[1] == "IR version 8; opsets: ai.onnx 13; producer edge-agent"
    assert "loads on onnxruntime >= 1.10; this runtime" in lines[2]
    assert (
        "  x  float32  [1, 4]" in lines
        and "operators: 1 nodes, 1 kinds" in lines
        and any(line.startswith("  Identity      1") for line in lines)
    )


def test_pull_refused_for_an_old_runtime_is_one_line_and_exit_1(
    keys: Path, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, url = served
    cli(
        "registry",
        "publish",
        "--root",
        root,
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--file",
        tiny(tmp_path / "a.onnx", opset=16),
        "--key",
        keys / "registry.key",
        "--channel",
        "stable",
    )
    out = pull(url, keys, "m", tmp_path / "s", "--target-ort", "1.10")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "edge-agent models: refused: m 1.0.0: variant fp32 needs ai.onnx opset 16; this runtime loads up to 15"
    )


def test_serve_speaks_head_range_and_etag(keys: Path, served: tuple[Path, str], tmp_path: Path) -> None:
    root, url = served
    cli(
        "registry",
        "publish",
        "--root",
        root,
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--file",
        tiny(tmp_path / "a.onnx", doc=b"z" * 1000),
        "--key",
        keys / "registry.key",
    )
    blob = next((root / "blobs" / "sha256").iterdir())
    data = blob.read_bytes()
    head = requests.head(url + f"blobs/sha256/{blob.name}", timeout=10)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data) and head.content == b""
    assert head.headers["ETag"] == f'"{blob.name}"' and head.headers["Accept-Ranges"] == "bytes"
    part = requests.get(url + f"blobs/sha256/{blob.name}", headers={"Range": "bytes=100-"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    tail = requests.get(url + f"blobs/sha256/{blob.name}", headers={"Range": "bytes=-10"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert (
        requests.get(
            url + f"blobs/sha256/{blob.name}", headers={"Range": f"bytes={len(data)}-"}, timeout=10
        ).status_code
        == 416
    )
    manifest = requests.get(url + "models/m/1.0.0/manifest.json", timeout=10)
    assert manifest.headers["Content-Type"] == "application/json"
    again = requests.get(
        url + "models/m/1.0.0/manifest.json", headers={"If-None-Match": manifest.headers["ETag"]}, timeout=10
    )
    assert again.status_code == 304 and again.content == b""
    for sneaky in ("..%2f..%2fetc/passwd", "models/../../keys/registry.key", ".hidden"):
        assert requests.get(url + sneaky, timeout=10).status_code == 404


@pytest.mark.parametrize(
    "args,code,message",
    [
        (
            (
                "registry",
                "publish",
                "--root",
                "{tmp}/r",
                "--model",
                "m",
                "--version",
                "1",
                "--file",
                "{tmp}/nope.onnx",
                "--key",
                "{tmp}/k",
            ),
            2,
            "no signing key at",
        ),
        (("models", "pull", "m", "--state-dir", "{tmp}/s"), 2, "give --registry URL and --public-key FILE"),
        (("models", "rollback", "m", "--state-dir", "{tmp}/s"), 1, "m is not in the store"),
        (("models", "inspect", "{tmp}/nope.onnx"), 2, "no such file"),
        (("models", "list"), 2, "give --state-dir DIR or --profile FILE"),
        (
            (
                "models",
                "pull",
                "m",
                "--state-dir",
                "{tmp}/s",
                "--registry",
                "http://x/",
                "--public-key",
                "{tmp}/k",
                "--keep",
                "1",
            ),
            2,
            "--keep must be at least 2",
        ),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], code: int, message: str) -> None:
    out = cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert out.returncode == code and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("m\n", (), f'model: expected {NAME_WORDS}, got "m\\n"'),  # re.match with `$` let this through
        ("../m", (), f'model: expected {NAME_WORDS}, got "../m"'),
        ("m", ("--version", "1.0.0\n"), f'version: expected {VERSION_WORDS}, got "1.0.0\\n"'),
        ("m", ("--channel", "stable\n"), f'channel: expected {NAME_WORDS}, got "stable\\n"'),
        ("m", ("--variant", "fp32\n"), f'variant id: expected {NAME_WORDS}, got "fp32\\n"'),
    ],
)
def test_publish_checks_names_with_the_one_pattern(
    keys: Path, tmp_path: Path, model: str, extra: tuple[str, ...], message: str
) -> None:
    root = tmp_path / "r"
    out = publish(root, model, tiny(tmp_path / "m.onnx"), keys, *extra)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not list(root.rglob("manifest.json")) and not list(root.rglob("stable*")), "nothing published"


def test_inspect_a_real_model_without_onnx(sample_model: Callable[[str], Path]) -> None:
    out = cli("models", "inspect", sample_model("silero-vad-op18"), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["ir_version"], doc["opsets"], doc["min_runtime"], doc["loads_here"]) == (
        10,
        {"ai.onnx": 18},
        "1.18",
        True,
    )
    assert [i["name"] for i in doc["inputs"]] == ["input", "sr", "state"] and doc["ops"]["If"] == 1


def test_a_scikit_learn_zipmap_model_is_published_with_default_vectors_and_pulled(
    keys: Path, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, url = served
    out = publish(root, "clf", zipmap_classifier(tmp_path / "clf.onnx"), keys, "--channel", "stable")
    assert out.returncode == 0, out.stderr
    pulled = pull(url, keys, "clf", tmp_path / "s", "--quiet")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("clf 1.0.0 activated (variant fp32, tested on CPUExecutionProvider")


def test_a_model_whose_outputs_vectors_cannot_hold_is_refused_at_publish(keys: Path, tmp_path: Path) -> None:
    out = publish(tmp_path / "r", "seq", sequence_model(tmp_path / "seq.onnx"), keys)
    assert out.returncode == 2 and out.stderr.strip() == (
        "edge-agent registry: seq.onnx: the test vectors cannot be stored: output 'seq' is a sequence of tensors; "
        "test vectors hold tensors, maps and sequences of maps (give --no-tests to publish it untested)"
    ), out.stderr
    assert not (tmp_path / "r" / "models").exists()


def test_default_vectors_of_a_model_that_outputs_only_nan_are_refused_at_publish(keys: Path, tmp_path: Path) -> None:
    out = publish(tmp_path / "r", "nan", nan_model(tmp_path / "nan.onnx"), keys)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "nan.onnx: every value of output 'y' is NaN on the test inputs" in out.stderr
