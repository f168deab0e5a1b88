"""`edge-agent probe` and `edge-agent bench` as a user runs them: output, the documented JSON schema, errors."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import onnxruntime as ort
import pytest

from tests.helpers.models import save, unary_model
from tests.test_providers import openvino_venv

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "hardware"
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script in a subprocess: the end-to-end path."""
    command = [str(EDGE_AGENT)] if EDGE_AGENT.exists() else [sys.executable, "-m", "agent"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The same entry point in this process: fast enough to run once per case."""
    from agent.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(list(args))
    finally:
        # main() installs its own stderr handler; later tests must not log into this test's capture.
        root.handlers[:], root.level = handlers, level
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def documented_schema() -> dict:
    text = (REPO / "docs" / "probe.md").read_text()
    block = re.search(r"### Schema\n\n```json\n(.*?)\n```", text, re.S)
    assert block, "docs/probe.md lost its schema block"
    return json.loads(block.group(1))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(unary_model(shape=("N", 16)), tmp_path_factory.mktemp("m") / "relu.onnx")


def test_probe_json_of_this_machine_matches_the_documented_schema(tmp_path: Path) -> None:
    out = cli("probe", "--json", "--verify", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    jsonschema.validate(doc, documented_schema())
    assert doc["runtime"]["version"] == ort.__version__ and doc["disk"]["path"] == str(tmp_path)
    kept = [c for c in doc["ranking"] if c["kept"]]
    assert kept and doc["verified"]["provider"] == kept[0]["provider"] == doc["verified"]["providers"][0]


@pytest.mark.parametrize("device", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_probe_json_of_every_captured_device_matches_the_schema(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = in_process(capsys, "probe", "--json", "--root", str(FIXTURES / device))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    jsonschema.validate(doc, documented_schema())
    assert doc["root"] == str(FIXTURES / device) and doc["verified"] is None


def test_the_schema_rejects_undocumented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    out = in_process(capsys, "probe", "--json", "--root", str(FIXTURES / "intel-nuc14"))
    doc = json.loads(out.stdout)
    doc["accelerators"][0]["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, documented_schema())


def test_probe_text_shows_hardware_ranking_and_reasons() -> None:
    out = cli("probe", "--root", str(FIXTURES / "x86-rtx3060"))
    assert out.returncode == 0, out.stderr
    assert "  gpu:          NVIDIA GeForce RTX 3060 (driver nvidia; 550.54.14; 12.0 GiB; /dev/nvidia0)" in out.stdout
    assert f"  build:        cpu (onnxruntime {ort.__version__})\n" in out.stdout
    assert (
        "  wanted:       cuda: NVIDIA GeForce RTX 3060 (driver 550.54.14): onnxruntime-gpu has the CUDA" in out.stdout
    )
    assert (
        "  to install:   sudo scripts/install.sh --runtime cuda; in a virtualenv: "
        "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.18,<2'\n"
    ) in out.stdout
    assert re.search(r"^  1\.  CPUExecutionProvider +kept: always present: 12 cores", out.stdout, re.M)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert re.search(
            r"^  -   CUDAExecutionProvider +dropped: NVIDIA GeForce RTX 3060 found, but CUDA is not in this",
            out.stdout,
            re.M,
        )


# The onnxruntime build each captured device wants (docs/probe.md, "Which onnxruntime build").
WANTED = {
    "intel-nuc14": ("openvino", "Intel x86-64 CPU with avx2 and the Intel GPU and NPU, which only OpenVINO reaches"),
    "jetson-agx-orin": ("jetson", "NVIDIA Jetson AGX Orin Developer Kit (L4T 36.3.0): NVIDIA's onnxruntime-gpu"),
    "rpi4": ("cpu", "aarch64 Cortex-A72: the PyPI onnxruntime wheel (CPU provider)"),
    "rpi5-hailo": ("cpu", "aarch64 Cortex-A76: the PyPI onnxruntime wheel (CPU provider)"),
    "x86-rtx3060": ("cuda", "NVIDIA GeForce RTX 3060 (driver 550.54.14): onnxruntime-gpu"),
}


def test_every_captured_device_has_its_wanted_build() -> None:
    assert sorted(WANTED) == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("device", sorted(WANTED))
def test_probe_says_which_onnxruntime_build_a_device_wants_and_how_to_install_it(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = in_process(capsys, "probe", "--json", "--root", str(FIXTURES / device))
    runtime = json.loads(out.stdout)["runtime"]
    build, reason = WANTED[device]
    wanted = runtime["wanted"]
    assert wanted["build"] == build and wanted["reason"].startswith(reason)
    assert wanted["install"] == f"sudo scripts/install.sh --runtime {build}"
    # What is installed is this interpreter's build: the plain wheel of the project's .venv.
    assert (runtime["build"], runtime["distributions"], runtime["recorded"]) == (
        "cpu",
        [f"onnxruntime {ort.__version__}"],
        None,
    )
    swap = "" if build == "cpu" else "pip uninstall -y onnxruntime && "
    index = " --index-url https://pypi.jetson-ai-lab.io/jp6/cu126" if build == "jetson" else ""
    assert wanted["pip"].startswith(swap + "pip install 'onnxruntime") and wanted["pip"].endswith(f"'{index}")


def test_the_install_plan_puts_the_build_in_place_of_onnxruntime_and_refuses_a_foreign_one() -> None:
    """What scripts/install.sh and images/Dockerfile install (the plan needs only the standard library)."""
    from agent.cli.probe import install_plan

    def names(plan: dict) -> list[str]:
        return [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in plan["dependencies"]]

    jetson = install_plan("auto", root=str(FIXTURES / "jetson-agx-orin"))
    assert (jetson["build"], jetson["requirement"], jetson["index_url"]) == (
        "jetson",
        "onnxruntime-gpu>=1.18,<2",
        "https://pypi.jetson-ai-lab.io/jp6/cu126",
    )
    assert "onnxruntime" not in names(jetson) and "numpy" in names(jetson) and "onnx" not in names(jetson)
    assert jetson["remove"] == ["onnxruntime"]  # the plain build of this .venv goes first
    cpu = install_plan("cpu", extras="cloud", root=str(FIXTURES / "rpi4"))
    assert cpu["requirement"].startswith("onnxruntime") and cpu["remove"] == [] and "onnx" in names(cpu)
    with pytest.raises(
        ValueError, match=r"onnxruntime-openvino \(openvino\) has wheels for x86_64 only; this is aarch64"
    ):
        install_plan("openvino", root=str(FIXTURES / "rpi4"))
    with pytest.raises(ValueError, match="unknown onnxruntime build 'tpu'"):
        install_plan("tpu")


def test_probe_verify_with_a_profile_that_forbids_cpu_fallback_fails_loudly(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is built in here")
    profile = tmp_path / "p.yaml"
    profile.write_text(
        f"device: {{id: d1, state_dir: {tmp_path / 'state'}}}\n"
        "runtime: {providers: [cuda], require_accelerator: true}\n"
    )
    out = cli("probe", "--profile", str(profile), "--verify")
    assert out.returncode == 1, out.stderr
    assert (
        "Verified: FAILED: runtime.require_accelerator is true, but no accelerator runs this model here" in out.stdout
    )
    assert "fell back from CUDAExecutionProvider: asked for (#1 in the list), but not in this onnxruntime" in out.stdout


def test_probe_with_a_bad_profile_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("device: {id: d1}\nruntime: {providers: [cudx]}\n")
    out = in_process(capsys, "probe", "--profile", str(profile))
    assert out.returncode == 2
    assert (
        out.stderr
        == f"edge-agent probe: {profile}:2: runtime.providers[0]: unknown execution provider 'cudx' (did you mean 'cuda'?)\n"
    )


def test_bench_prints_a_verified_table_with_progress_and_writes_json(model: Path, tmp_path: Path) -> None:
    out = cli(
        "bench",
        "--model",
        str(model),
        "--providers",
        "cpu",
        "--threads",
        "1",
        "2",
        "--runs",
        "5",
        "--shape",
        "x=4x16",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["provider", "threads", "verified", "on", "p50", "ms", "p95", "ms", "inf/s"]
    rows = [line.split() for line in lines[1:3]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("CPUExecutionProvider", "1", "CPUExecutionProvider"),
        ("CPUExecutionProvider", "2", "CPUExecutionProvider"),
    ]
    assert all(float(r[3]) <= float(r[4]) and float(r[5]) > 0 for r in rows)
    assert lines[3].startswith("fastest: CPUExecutionProvider with ")
    assert "bench: " in out.stderr and "100% done" in out.stderr
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["inputs"] == {"x": [4, 16]} and [t["runs"] for t in saved["trials"]] == [5, 5]


def test_bench_an_unusable_provider_is_a_row_of_why_not(model: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is built in here")
    out = cli("bench", "--model", str(model), "--providers", "cuda", "cpu", "--threads", "1", "--runs", "2")
    assert out.returncode == 0, out.stderr
    assert (
        "bench: CUDAExecutionProvider: not usable: asked for (#1 in the list), but not in this onnxruntime"
        in out.stderr
    )
    assert [line.split()[0] for line in out.stdout.splitlines()[1:2]] == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model.onnx"], "edge-agent bench: --model /no/such/model.onnx: no such file\n"),
        (["--providers", "cudx"], "edge-agent bench: unknown execution provider 'cudx' (did you mean 'cuda'?)\n"),
        (["--shape", "y=1x2"], "edge-agent bench: --shape: the model has no input 'y' (inputs: x)\n"),
        (["--shape", "x=big"], "edge-agent bench: --shape 'x=big': expected INPUT=DIMS like x=1x3x480x640\n"),
    ],
    ids=["missing-model", "unknown-provider", "unknown-input", "bad-shape"],
)
def test_bench_bad_input_is_one_line_and_exit_2(
    model: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if args[0] != "--model":
        args = ["--model", str(model), *args]
    out = in_process(capsys, "bench", *args)
    assert (out.returncode, out.stderr) == (2, message)


def test_bench_missing_model_end_to_end_is_one_line_and_exit_2() -> None:
    out = cli("bench", "--model", "/no/such/model.onnx")
    assert (out.returncode, out.stdout, out.stderr) == (
        2,
        "",
        "edge-agent bench: --model /no/such/model.onnx: no such file\n",
    )


def test_bench_a_file_that_is_not_a_model_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    out = in_process(capsys, "bench", "--model", str(bad))
    assert out.returncode == 2 and out.stderr.startswith(
        f"edge-agent bench: {bad}: not a model this onnxruntime can load ("
    )
    assert out.stderr.count("\n") == 1


# ---- the same commands with onnxruntime-openvino, in its own virtualenv ----------------------------


@pytest.fixture(scope="module")
def openvino_python() -> str:
    return openvino_venv()


@pytest.mark.slow
def test_probe_and_bench_with_openvino_report_the_verified_provider(
    openvino_python: str, sample_model, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    probe_out = subprocess.run(
        [openvino_python, "-m", "agent", "probe", "--json", "--verify"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert probe_out.returncode == 0, probe_out.stderr
    doc = json.loads(probe_out.stdout)
    jsonschema.validate(doc, documented_schema())
    first = doc["ranking"][0]
    assert (first["provider"], first["options"], first["kept"]) == (
        "OpenVINOExecutionProvider",
        {"device_type": "CPU"},
        True,
    )
    assert doc["verified"]["provider"] == "OpenVINOExecutionProvider" == doc["verified"]["providers"][0]
    runtime = doc["runtime"]
    assert runtime["build"] == "openvino" == runtime["wanted"]["build"]
    assert runtime["distributions"] == [f"onnxruntime-openvino {runtime['version']}"]
    assert doc["verified"]["fallbacks"] == [] and doc["verified"]["options"]["cache_dir"].endswith("/cache/openvino")

    model = sample_model("ppocr-det")
    bench = subprocess.run(
        [
            openvino_python,
            "-m",
            "agent",
            "bench",
            "--model",
            str(model),
            "--providers",
            "openvino",
            "cpu",
            "--threads",
            "2",
            "--runs",
            "3",
            "--shape",
            "x=1x3x480x640",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert bench.returncode == 0, bench.stderr
    rows = [line.split()[:3] for line in bench.stdout.splitlines()[1:3]]
    assert rows == [
        ["OpenVINOExecutionProvider[CPU]", "2", "OpenVINOExecutionProvider"],
        ["CPUExecutionProvider", "2", "CPUExecutionProvider"],
    ]
    assert re.match(r"fastest: \S+ with 2 threads, p50 [\d.]+ ms", bench.stdout.splitlines()[3])
    trials = json.loads((tmp_path / "b.json").read_text())["trials"]
    assert [(t["provider"], t["verified"], t["runs"]) for t in trials] == [
        ("OpenVINOExecutionProvider", "OpenVINOExecutionProvider", 3),
        ("CPUExecutionProvider", "CPUExecutionProvider", 3),
    ]


def test_no_verb_sends_onnxruntime_telemetry_unless_the_operator_asks(tmp_path: Path) -> None:
    """onnxruntime's Linux wheels start a telemetry thread at import (it writes `$TMPDIR/.ses` and posts
    to Microsoft's collector); `edge-agent` turns it off before any verb loads onnxruntime, and an
    operator's own `ORT_DISABLE_TELEMETRY` wins."""

    def ses_after_probe(name: str, **env: str) -> bool:
        tmp = tmp_path / name
        tmp.mkdir()
        clean = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
        command = [str(EDGE_AGENT)] if EDGE_AGENT.exists() else [sys.executable, "-m", "agent"]
        done = subprocess.run(
            [*command, "probe", "--json"], env={**clean, "TMPDIR": str(tmp), **env}, capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return (tmp / ".ses").exists()

    if not ses_after_probe("asked", ORT_DISABLE_TELEMETRY="0"):
        pytest.skip(f"onnxruntime {ort.__version__} starts no telemetry here")
    assert not ses_after_probe("default"), "onnxruntime's telemetry ran in an edge-agent process"
