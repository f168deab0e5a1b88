"""Custom-op libraries end to end: onnxruntime-extensions' real library published as a signed blob, pulled,
verified, registered and run by a real agent; tampered, foreign and too-new libraries refused before
anything loads them; the profile's `runtime.custom_ops`; `models inspect` naming the library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cloud.publish import PublishError
from agent.config.profile import RuntimeConfig
from agent.device.compat import caps_for
from agent.device.customops import CustomOpsError, elf_platform, this_platform
from agent.device.session import open_session
from agent.models.manifest import ManifestError, parse_manifest
from agent.models.store import Store
from agent.transport.events import Event
from agent.util.hashing import sha256_file
from tests.helpers.profiles import validated
from tests.helpers.registry import Registry

onnx = pytest.importorskip("onnx")
extensions = pytest.importorskip("onnxruntime_extensions")

REPO = Path(__file__).resolve().parent.parent
HERE = this_platform()
CONTRIB = "ai.onnx.contrib"


def agent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.fixture(scope="module")
def library() -> Path:
    path = Path(extensions.get_library_path())
    if elf_platform(path) != HERE:
        pytest.skip(f"onnxruntime-extensions' library here is not for {HERE}")
    return path


def inverse_model(path: Path, contrib_opset: int = 1) -> Path:
    """y = inverse(reshape(x, [2, 2])) with onnxruntime-extensions' `Inverse` (ai.onnx.contrib): a sensor
    row of four numbers in, a 2x2 matrix out."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["x", "shape"], ["m"]),
        helper.make_node("Inverse", ["m"], ["y"], domain=CONTRIB),
    ]
    graph = helper.make_graph(
        nodes,
        "inverse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(CONTRIB, contrib_opset)]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def matrix_inputs(path: Path) -> Path:
    np.savez(path, x=np.array([[2, 0, 0, 4]], np.float32))
    return path


def foreign_library(path: Path, machine: int = 183) -> Path:
    """An ELF shared object header for another machine (183: aarch64) and some bytes: what a library built
    for a Raspberry Pi looks like to an x86-64 publisher."""
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + (3).to_bytes(2, "little") + machine.to_bytes(2, "little")
    path.write_bytes(header + bytes(4096 - len(header)))
    return path


def mapped_under(folder: Path) -> list[str]:
    """Files under `folder` that this process has mapped (a dlopen'ed library shows here)."""
    maps = Path("/proc/self/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if str(folder) in line})


def test_extensions_model_is_published_pulled_verified_and_run_by_a_real_agent(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    pub = agent(
        "registry", "publish", "--root", str(registry.root), "--key", str(registry.key), "--model", "inverse",
        "--version", "1.0.0", "--file", str(model), "--test-inputs", str(matrix_inputs(tmp_path / "in.npz")),
        "--custom-ops", f"{HERE}={library}", "--channel", "stable",
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    assert f"  custom-op library for {HERE}: {CONTRIB} 1, onnxruntime >= " in pub.stdout
    manifest = parse_manifest(registry.manifest_path("inverse", "1.0.0").read_bytes())
    (entry,) = manifest.variants[0].custom_ops or ()
    assert (entry.platform, entry.domains, entry.blob.size) == (HERE, {CONTRIB: 1}, library.stat().st_size)
    assert (registry.root / "blobs" / "sha256" / entry.blob.hex).read_bytes() == library.read_bytes()
    assert manifest.tests, "the test vectors are computed with the library registered"

    state = tmp_path / "state"
    pull = agent(
        "models", "pull", "inverse", "--registry", registry.url, "--public-key", str(registry.public_key),
        "--state-dir", str(state), "-q",
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    assert "inverse 1.0.0 activated (variant fp32, tested on CPUExecutionProvider" in pull.stdout
    installed = state / "models" / "inverse" / "1.0.0" / "customops" / f"{entry.blob.hex}.so"
    assert installed.read_bytes() == library.read_bytes()

    inspect = agent("models", "inspect", "inverse", "--state-dir", str(state))
    assert inspect.returncode == 0, inspect.stderr
    assert f"custom domain {CONTRIB} opset 1: library {installed} ({HERE}, {CONTRIB} up to opset 1" in inspect.stdout
    assert "this runtime" in inspect.stdout and "loads it" in inspect.stdout

    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,c,d\n2,0,0,4\n1,2,3,4\n")
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(
            {
                "device": {"id": "ext-1", "state_dir": str(state)},
                "registry": {"url": registry.url, "public_key": str(registry.public_key), "poll_interval": "1h"},
                "pipelines": [{"name": "inv", "model": "inverse", "source": {"type": "csv", "path": str(csv)}}],
            }
        )
    )
    run = agent("run", "--profile", str(profile))
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["model_version"] for r in results] == ["1.0.0", "1.0.0"]
    np.testing.assert_allclose(results[0]["output"]["y"], [[0.5, 0.0], [0.0, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(results[1]["output"]["y"], np.linalg.inv([[1, 2], [3, 4]]), rtol=1e-5)


def test_a_library_changed_after_signing_is_refused_and_never_loaded(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    published = registry.publish(
        "inverse", "1.0.0", model, test_inputs=matrix_inputs(tmp_path / "in.npz"), custom_ops=((None, library),)
    )
    (entry,) = published.variant.custom_ops
    blob = registry.root / "blobs" / "sha256" / entry.blob.hex
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    blob.write_bytes(bytes(data))

    opened: list[Path] = []

    def opener(path: Path, runtime: RuntimeConfig, state_dir: Path, emit: object) -> object:
        opened.append(path)
        raise AssertionError("no session may be built for a refused library")

    events: list[Event] = []
    state = tmp_path / "state"
    result = registry.client(state, events, open_session=opener).check_and_pull("inverse")
    assert result.status == "refused"
    assert result.reason == (
        f"inverse 1.0.0 custom-op library for {HERE} does not match its signed digest {entry.blob.digest}"
    )
    assert [e.fields["reason"] for e in events if e.type == "model.refused"] == [result.reason]
    assert opened == [] and mapped_under(state) == []
    assert Store(state).active("inverse") is None
    assert not list(state.rglob("*.so")) and not (state / "models" / ".partial" / entry.blob.hex).exists()

    cli = agent(
        "models", "pull", "inverse", "--registry", registry.url, "--public-key", str(registry.public_key),
        "--state-dir", str(tmp_path / "cli-state"), "-q",
    )  # fmt: skip
    assert cli.returncode == 1
    assert f"refused: inverse 1.0.0: inverse 1.0.0 custom-op library for {HERE} does not match" in cli.stderr


def test_a_library_damaged_in_the_store_is_refused_before_onnxruntime_sees_it(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    registry.publish(
        "inverse",
        "1.0.0",
        inverse_model(tmp_path / "inverse.onnx"),
        test_inputs=matrix_inputs(tmp_path / "in.npz"),
        custom_ops=((HERE, library),),
    )
    state = tmp_path / "state"
    assert registry.client(state).check_and_pull("inverse").status == "activated"
    active = Store(state).active("inverse")
    assert active is not None
    (installed,) = (active.directory / "customops").iterdir()
    data = bytearray(installed.read_bytes())
    data[-1] ^= 0x01
    installed.write_bytes(bytes(data))
    with pytest.raises(CustomOpsError, match=r"customops/[0-9a-f]{64}\.so does not match its signed digest sha256:"):
        open_session(active.path, RuntimeConfig(), state)
    assert str(installed) not in mapped_under(state)  # the pull mapped its staged copy; this one never


def test_a_library_for_another_architecture_is_refused_before_download(registry: Registry, tmp_path: Path) -> None:
    other = "linux-riscv64" if HERE != "linux-riscv64" else "linux-aarch64"
    machine = 243 if other == "linux-riscv64" else 183
    lib = foreign_library(tmp_path / "libother.so", machine)
    published = registry.publish(
        "inverse", "1.0.0", inverse_model(tmp_path / "inverse.onnx"), custom_ops=((other, lib),), no_tests=True
    )
    (entry,) = published.variant.custom_ops
    assert (entry.platform, entry.domains) == (other, {CONTRIB: 1})
    events: list[Event] = []
    result = registry.client(tmp_path / "state", events).check_and_pull("inverse")
    assert result.status == "refused"
    assert result.reason == (
        f"variant fp32 needs custom domain '{CONTRIB}' (opset 1); no custom-op library fits: "
        f"the library for {other}: it is built for {other}; this device is {HERE}"
    )
    assert registry.blob_requests() == []
    assert [e.type for e in events] == ["model.refused"]


@pytest.mark.parametrize(
    ("domains", "runtime", "why"),
    [
        ({"com.other": 1}, "1.20", f"it does not provide domain '{CONTRIB}'"),
        ({CONTRIB: 1}, "1.20", f"it provides {CONTRIB} up to opset 1; the model needs 2"),
        ({CONTRIB: 2}, "1.32", "it needs onnxruntime 1.32 or newer; this is 1.20.1"),
    ],
)
def test_domain_opset_and_runtime_are_checked_before_download(
    registry: Registry, tmp_path: Path, library: Path, domains: dict[str, int], runtime: str, why: str
) -> None:
    registry.publish(
        "inverse", "2.0.0", inverse_model(tmp_path / "v2.onnx", contrib_opset=2), custom_ops=((None, library),)
    )

    def declare(doc: dict[str, Any]) -> None:  # a validly signed manifest that says less of its library
        doc["variants"][0]["custom_ops"][0].update(domains=domains, min_runtime=runtime)

    registry.resign("inverse", "2.0.0", declare)
    events: list[Event] = []
    result = registry.client(tmp_path / "state", events, caps=caps_for("1.20.1")).check_and_pull("inverse")
    assert result.status == "refused"
    assert result.reason == (
        f"variant fp32 needs custom domain '{CONTRIB}' (opset 2); no custom-op library fits: "
        f"the library for {HERE}: {why}"
    )
    assert registry.blob_requests() == [] and [e.type for e in events] == ["model.refused"]


def test_publishing_checks_each_library(registry: Registry, tmp_path: Path, library: Path) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    other = "linux-aarch64" if HERE != "linux-aarch64" else "linux-x86_64"
    with pytest.raises(PublishError, match=f"--custom-ops {other}={library}: the file is a shared library for {HERE}"):
        registry.publish("inverse", "1.0.0", model, custom_ops=((other, library),))
    text = tmp_path / "notes.so"
    text.write_text("not a library\n")
    with pytest.raises(PublishError, match=r"notes\.so: not a shared library \(no ELF header\)"):
        registry.publish("inverse", "1.0.0", model, custom_ops=((None, text),))
    from tests.helpers.models import custom_domain_model, save

    with pytest.raises(
        PublishError,
        match=f"--custom-domain: inverse.onnx imports {CONTRIB} opset 1; the libraries "
        "are declared with no such domain",
    ):
        registry.publish("inverse", "1.0.0", model, custom_ops=((None, library),), custom_domains={"com.other": 1})
    vision = save(custom_domain_model(), tmp_path / "vision.onnx")
    with pytest.raises(PublishError, match=r"onnxruntime does not load vision\.onnx with it: .*FancyOp"):
        registry.publish("vision", "1.0.0", vision, custom_ops=((None, library),), no_tests=True)
    assert not registry.manifest_path("inverse", "1.0.0").exists()
    plain = registry.publish("plain", "1.0.0", registry.tiny("plain"))
    assert b"custom_ops" not in plain.manifest.to_bytes()  # older agents keep parsing plain manifests


def test_two_libraries_for_one_platform_in_a_manifest_are_refused(registry: Registry, tmp_path: Path) -> None:
    published = registry.publish("m", "1.0.0", registry.tiny("m"))
    doc = json.loads(published.manifest.to_bytes())
    lib = {"blob": registry.put(b"x" * 64), "platform": "linux-x86_64", "domains": {CONTRIB: 1}}
    doc["variants"][0]["custom_ops"] = [lib, lib]
    with pytest.raises(ManifestError, match="two custom-op libraries for linux-x86_64"):
        parse_manifest(json.dumps(doc).encode())


def test_profile_libraries_are_checked_and_registered(tmp_path: Path, library: Path) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,c,d\n4,0,0,8\n")
    pipelines = [{"name": "inv", "model": "inverse.onnx", "source": {"type": "csv", "path": "rows.csv"}}]
    profile = tmp_path / "profile.json"

    def write(runtime: dict[str, object]) -> Path:
        profile.write_text(
            json.dumps({"device": {"id": "d", "state_dir": "state"}, "runtime": runtime, "pipelines": pipelines})
        )
        return profile

    without = agent("run", "--profile", str(write({})))
    assert without.stdout == ""
    assert f"needs custom domain '{CONTRIB}' (opset 1); no custom-op library for it is registered here" in (
        without.stderr
    )
    (tmp_path / "notes.so").write_text("not a library\n")
    bad = agent("check", str(write({"custom_ops": ["notes.so", "gone.so"]})))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"{profile}:1: runtime.custom_ops[0]: {tmp_path / 'notes.so'}: not a shared library (no ELF header) "
        "(expected a custom-op library)",
        f"{profile}:1: runtime.custom_ops[1]: no such file: {tmp_path / 'gone.so'} (a custom-op library)",
    ]
    good = agent("run", "--profile", str(write({"custom_ops": [str(library)]})))
    assert good.returncode == 0, good.stderr
    (result,) = [json.loads(line) for line in good.stdout.splitlines()]
    np.testing.assert_allclose(result["output"]["y"], [[0.25, 0.0], [0.0, 0.125]], rtol=1e-6)
    inspect = agent("models", "inspect", str(model), "--profile", str(profile), "--json")
    doc = json.loads(inspect.stdout)
    assert doc["loads_here"] is True
    assert doc["custom_domains"][CONTRIB]["libraries"] == [
        f"{library} (runtime.custom_ops; its domains are proven when the model loads)"
    ]


def rebuilt_library(library: Path, path: Path) -> Path:
    """Another build of the same library: its bytes and bytes after the last segment, which the loader
    ignores (a different sha256 that still loads and provides the same domain)."""
    path.write_bytes(library.read_bytes() + b"\0rebuilt\0")
    return path


def test_identical_model_bytes_with_other_libraries_get_their_own_shared_session(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    from agent.inference.sessions import SessionPool

    model = inverse_model(tmp_path / "inverse.onnx")
    inputs = matrix_inputs(tmp_path / "in.npz")
    rebuilt = rebuilt_library(library, tmp_path / "librebuilt.so")
    state = tmp_path / "state"
    client = registry.client(state, keep=4)
    for version, lib in (("1.0.0", library), ("1.0.1", rebuilt), ("1.0.2", library)):
        registry.publish("inverse", version, model, test_inputs=inputs, custom_ops=((None, lib),))
        assert client.check_and_pull("inverse").status == "activated"
    store = Store(state)
    paths = {v: store.installed("inverse", v).path for v in ("1.0.0", "1.0.1", "1.0.2")}
    assert len({p.read_bytes() for p in paths.values()}) == 1  # one model, byte for byte

    pool = SessionPool()
    first = pool.acquire(paths["1.0.0"], RuntimeConfig(), state)
    other = pool.acquire(paths["1.0.1"], RuntimeConfig(), state)
    same = pool.acquire(paths["1.0.2"], RuntimeConfig(), state)  # its own folder, the same library bytes
    assert other is not first and same is first
    assert first.key.digest == other.key.digest
    assert first.key.libraries == ("sha256:" + sha256_file(library),)
    assert other.key.libraries == ("sha256:" + sha256_file(rebuilt),)
    assert len(pool.sessions()) == 2
    x = {"x": np.array([[2, 0, 0, 4]], np.float32)}
    for shared in (first, other):
        np.testing.assert_allclose(shared.run(x)[0], [[0.5, 0.0], [0.0, 0.25]], rtol=1e-6)
    assert mapped_under(state / "models" / "inverse" / "1.0.1")  # the rebuilt library is the one it loaded
    for shared in (first, other, same):
        pool.release(shared)
    assert pool.sessions() == []


def test_bench_registers_the_libraries_installed_with_a_model_or_named_by_the_profile(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    registry.publish(
        "inverse", "1.0.0", model, test_inputs=matrix_inputs(tmp_path / "in.npz"), custom_ops=((None, library),)
    )
    state = tmp_path / "state"
    assert registry.client(state).check_and_pull("inverse").status == "activated"
    active = Store(state).active("inverse")
    assert active is not None
    (installed,) = (active.directory / "customops").iterdir()
    quick = ("--runs", "3", "--warmup", "1", "--threads", "1", "--providers", "cpu")

    out = tmp_path / "bench.json"
    bench = agent("bench", "--model", str(active.path), *quick, "--json", str(out))
    assert bench.returncode == 0, bench.stderr
    assert f"bench: custom-op library {installed}\n" in bench.stderr
    (row,) = [line.split() for line in bench.stdout.splitlines() if line.startswith("CPUExecutionProvider ")]
    assert row[:3] == ["CPUExecutionProvider", "1", "CPUExecutionProvider"]  # timed, on the provider verified
    doc = json.loads(out.read_text())
    assert doc["custom_ops"] == [str(installed)]
    assert [(t["error"], t["runs"]) for t in doc["trials"]] == [(None, 3)]

    plain = agent("bench", "--model", str(model), *quick)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().endswith(
        f"--model {model}: variant inverse.onnx needs custom domain '{CONTRIB}' (opset 1); "
        "no custom-op library for it is registered here"
    )
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": {"id": "d"}, "runtime": {"custom_ops": [str(library)]}}))
    named = agent("bench", "--model", str(model), "--profile", str(profile), *quick)
    assert named.returncode == 0, named.stderr
    assert f"bench: custom-op library {library}\n" in named.stderr and "fastest: CPUExecutionProvider" in named.stdout

    data = bytearray(installed.read_bytes())
    data[-1] ^= 0x01
    installed.write_bytes(bytes(data))
    damaged = agent("bench", "--model", str(active.path), *quick)
    assert damaged.returncode == 2 and damaged.stdout == ""
    assert f"custom-op library {installed} does not match its signed digest sha256:" in damaged.stderr


def test_models_list_verify_rehashes_the_installed_libraries(registry: Registry, tmp_path: Path, library: Path) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    inputs = matrix_inputs(tmp_path / "in.npz")
    state = tmp_path / "state"
    client = registry.client(state)
    for version in ("1.0.0", "1.1.0"):
        registry.publish("inverse", version, model, test_inputs=inputs, custom_ops=((None, library),))
        assert client.check_and_pull("inverse").status == "activated"
    store = Store(state)
    active, previous = (
        next((store.installed("inverse", v).directory / "customops").iterdir()) for v in ("1.1.0", "1.0.0")
    )

    def verify() -> subprocess.CompletedProcess[str]:
        return agent("models", "list", "--state-dir", str(state), "--verify")

    clean = verify()
    assert clean.returncode == 0, clean.stderr
    assert "damaged" not in clean.stdout and "inverse: active 1.1.0" in clean.stdout

    data = bytearray(active.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size: only re-hashing tells
    active.write_bytes(bytes(data))
    previous.write_bytes(previous.read_bytes()[:-1])
    damaged = verify()
    assert damaged.returncode == 1
    assert [line for line in damaged.stdout.splitlines() if "damaged" in line] == [
        f"  damaged: active: custom-op library {active} does not match its signed digest sha256:{active.stem}",
        f"  damaged: previous: custom-op library {previous} is {library.stat().st_size - 1} bytes; "
        f"its signed size is {library.stat().st_size}",
    ]
    assert agent("models", "list", "--state-dir", str(state)).returncode == 0  # only --verify looks

    active.unlink()
    sidecar = store.installed("inverse", "1.0.0").path.with_name("model.onnx.customops.json")
    sidecar.write_text("[{")
    doc = json.loads(agent("models", "list", "--state-dir", str(state), "--verify", "--json").stdout)
    assert doc[0]["problems"] == [
        f"active: custom-op library {active} is missing; the store is damaged",
        f"previous: {sidecar}: unreadable (JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 1 column 3 (char 2)); the store is damaged",
    ]


def test_a_profile_library_that_declares_its_domains_refuses_a_variant_before_download(
    registry: Registry, tmp_path: Path, library: Path
) -> None:
    other = "linux-riscv64" if HERE != "linux-riscv64" else "linux-aarch64"
    foreign = foreign_library(tmp_path / "libother.so", 243 if other == "linux-riscv64" else 183)
    model = inverse_model(tmp_path / "v2.onnx", contrib_opset=2)
    registry.publish("inverse", "2.0.0", model, custom_ops=((other, foreign),), no_tests=True)

    def pull(domains: dict[str, int] | None) -> tuple[Any, list[Event]]:
        runtime = validated(RuntimeConfig, custom_ops=[{"path": str(library), "domains": domains}])
        events: list[Event] = []
        client = registry.client(tmp_path / f"state-{len(registry.blob_requests())}", events, runtime=runtime)
        return client.check_and_pull("inverse"), events

    for declared, why in (
        ({"com.other": 1}, f"it does not provide domain '{CONTRIB}'"),
        ({CONTRIB: 1, "com.other": 3}, f"it provides {CONTRIB} up to opset 1; the model needs 2"),
    ):
        result, events = pull(declared)
        assert result.status == "refused"
        assert result.reason == (
            f"variant fp32 needs custom domain '{CONTRIB}' (opset 2); no custom-op library fits: "
            f"the library for {other}: it is built for {other}; this device is {HERE}; "
            f"the profile's runtime.custom_ops ({library}): {why}"
        )
        assert registry.blob_requests() == [] and [e.type for e in events] == ["model.refused"]

    fits, _ = pull({CONTRIB: 2})
    assert (fits.status, fits.version) == ("activated", "2.0.0")
    undeclared, _ = pull(None)  # the plain form: it may provide anything, loading the model decides
    assert undeclared.status == "activated"


def test_declared_domains_through_the_cli(tmp_path: Path, library: Path) -> None:
    model = inverse_model(tmp_path / "inverse.onnx")
    (tmp_path / "rows.csv").write_text("a,b,c,d\n2,0,0,4\n")
    profile = tmp_path / "profile.yaml"

    def write(custom_ops: str) -> Path:
        profile.write_text(
            "device: {id: d, state_dir: state}\n"
            f"runtime:\n  custom_ops: {custom_ops}\n"
            "pipelines:\n  - {name: inv, model: inverse.onnx, source: {type: csv, path: rows.csv}}\n"
        )
        return profile

    write(f"[{{path: {library}, domains: {{com.other: 1}}}}]")
    assert agent("check", str(profile)).returncode == 0
    wrong = agent("run", "--profile", str(profile))
    assert wrong.stdout == ""
    assert f"needs custom domain '{CONTRIB}' (opset 1); no custom-op library for it is registered here" in wrong.stderr
    assert "is not a registered function/op" not in wrong.stderr  # refused by the pre-check, not by onnxruntime

    write(f"[{{path: {library}, domains: {{{CONTRIB}: 1}}}}]")
    good = agent("run", "--profile", str(profile))
    assert good.returncode == 0, good.stderr
    (result,) = [json.loads(line) for line in good.stdout.splitlines()]
    np.testing.assert_allclose(result["output"]["y"], [[0.5, 0.0], [0.0, 0.25]], rtol=1e-6)
    inspect = agent("models", "inspect", str(model), "--profile", str(profile), "--json")
    assert json.loads(inspect.stdout)["custom_domains"][CONTRIB]["libraries"] == [
        f"{library} (runtime.custom_ops, declares {CONTRIB} up to opset 1)"
    ]

    bad = agent("check", str(write(f"[{library}, {{path: {library}, domains: {{'ai onnx': 0}}}}]")))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"{profile}:3: runtime.custom_ops[1].domains: expected an operator domain such as ai.onnx.contrib "
        "(1 to 128 letters, digits, `_ . -`), got 'ai onnx'",
    ]
    bad = agent("check", str(write(f"[{{path: {library}, domains: {{{CONTRIB}: 0}}}}, 3]")))
    assert bad.stderr.splitlines() == [
        f"{profile}:3: runtime.custom_ops[0].domains: {CONTRIB}: expected the highest opset version it provides "
        "(1 to 1000), got 0",
        f"{profile}:3: runtime.custom_ops[1]: expected a library path, or {{path, domains}}, got 3",
    ]
