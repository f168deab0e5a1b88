"""Provider ranking per captured device, and real sessions: verified providers, fallback events, loud failure."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from agent.config.profile import RuntimeConfig
from agent.device.build import Verification, provider_options, why_not
from agent.device.hardware import Probe, RuntimeInfo, probe
from agent.device.onnxproto import add_relu_model
from agent.device.providers import CPU, CUDA, OPENVINO, TENSORRT, Candidate, canonical_provider, rank
from agent.device.session import AcceleratorUnavailableError, open_session
from agent.transport.events import Event
from tests.helpers.models import linear_model, unary_model
from tests.helpers.profiles import validated

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "hardware"
CPU_WHEEL = RuntimeInfo("1.32.0", ("AzureExecutionProvider", CPU))
GPU_WHEEL = RuntimeInfo("1.23.0", (TENSORRT, CUDA, CPU))
OPENVINO_WHEEL = RuntimeInfo("1.24.1", (OPENVINO, CPU))

NO_NVIDIA = [
    ("TensorrtExecutionProvider", False, "no NVIDIA GPU found"),
    ("CUDAExecutionProvider", False, "no NVIDIA GPU found"),
]
ARM_NO_OPENVINO = (
    "OpenVINOExecutionProvider",
    False,
    "OpenVINO's onnxruntime wheel is for x86-64; this CPU is aarch64",
)
AZURE = ("AzureExecutionProvider", False, "calls a remote endpoint; not a local inference provider")
RTX = "NVIDIA GeForce RTX 3060"
ORIN = "NVIDIA Jetson AGX Orin integrated GPU (tegra234)"
TRT_KEPT = (
    " found and the build has TensorRT: fastest on NVIDIA once its engine is built (engines cached under the state dir)"
)
CUDA_KEPT = " found and the build has CUDA: runs every op TensorRT cannot, no engine build"
I7 = "always present: 12 cores of 12th Gen Intel(R) Core(TM) i7-12700F (sse4_2 avx avx2 fma f16c avx_vnni)"
NUC_CPU = "always present: 16 cores of Intel(R) Core(TM) Ultra 7 155H (sse4_2 avx avx2 fma f16c avx_vnni)"
NUC_GPU = (
    "OpenVINOExecutionProvider[GPU]",
    True,
    "Intel Arc Graphics (Meteor Lake) at /dev/dri/renderD128: OpenVINO's GPU plugin "
    "(first load compiles; kernels cached under the state dir)",
)
NUC_OV_CPU = (
    "OpenVINOExecutionProvider[CPU]",
    True,
    "Intel x86-64 CPU with avx2: OpenVINO's CPU plugin, usually faster than the CPU "
    "provider on convolutional models (autotune measures it)",
)

# (fixture, runtime build, variant) -> the whole ranking: kept in order first, then dropped, each with its reason.
RANKINGS = {
    "rpi4-cpu-wheel": (
        "rpi4",
        CPU_WHEEL,
        None,
        [
            ("CPUExecutionProvider", True, "always present: 4 cores of Cortex-A72 (neon)"),
            *NO_NVIDIA,
            ARM_NO_OPENVINO,
            AZURE,
        ],
    ),
    "rpi5-hailo-cpu-wheel": (
        "rpi5-hailo",
        CPU_WHEEL,
        None,
        [
            ("CPUExecutionProvider", True, "always present: 4 cores of Cortex-A76 (neon asimdhp asimddp)"),
            *NO_NVIDIA,
            ARM_NO_OPENVINO,
            AZURE,
        ],
    ),
    "jetson-orin-gpu-wheel": (
        "jetson-agx-orin",
        GPU_WHEEL,
        None,
        [
            ("TensorrtExecutionProvider", True, ORIN + TRT_KEPT),
            ("CUDAExecutionProvider", True, ORIN + CUDA_KEPT),
            ("CPUExecutionProvider", True, "always present: 12 cores of Cortex-A78AE (neon asimdhp asimddp)"),
            ARM_NO_OPENVINO,
        ],
    ),
    "x86-rtx3060-gpu-wheel": (
        "x86-rtx3060",
        GPU_WHEEL,
        None,
        [
            ("TensorrtExecutionProvider", True, RTX + TRT_KEPT),
            ("CUDAExecutionProvider", True, RTX + CUDA_KEPT),
            ("CPUExecutionProvider", True, I7),
            (
                "OpenVINOExecutionProvider",
                False,
                "x86-64 CPU found, but OpenVINO is not in this onnxruntime 1.23.0 build (it has Tensorrt, "
                "CUDA, CPU); install onnxruntime-openvino in place of onnxruntime",
            ),
        ],
    ),
    "x86-rtx3060-cpu-wheel": (
        "x86-rtx3060",
        CPU_WHEEL,
        None,
        [
            ("CPUExecutionProvider", True, I7),
            (
                "TensorrtExecutionProvider",
                False,
                f"{RTX} found, but TensorRT is not in this onnxruntime 1.32.0 build (it has Azure, CPU); "
                "install onnxruntime-gpu and the TensorRT libraries",
            ),
            (
                "CUDAExecutionProvider",
                False,
                f"{RTX} found, but CUDA is not in this onnxruntime 1.32.0 build (it has Azure, CPU); "
                "install onnxruntime-gpu",
            ),
            (
                "OpenVINOExecutionProvider",
                False,
                "x86-64 CPU found, but OpenVINO is not in this onnxruntime 1.32.0 build (it has Azure, CPU); "
                "install onnxruntime-openvino in place of onnxruntime",
            ),
            AZURE,
        ],
    ),
    "nuc14-openvino-wheel-fp32": (
        "intel-nuc14",
        OPENVINO_WHEEL,
        None,
        [
            NUC_GPU,
            NUC_OV_CPU,
            ("CPUExecutionProvider", True, NUC_CPU),
            *NO_NVIDIA,
            (
                "OpenVINOExecutionProvider[NPU]",
                False,
                "Intel NPU (Meteor Lake) at /dev/accel/accel0, but auto keeps it for fp16 and int8 "
                "variants (this one is fp32); name openvino with device_type NPU in the profile to use it",
            ),
        ],
    ),
    "nuc14-openvino-wheel-int8": (
        "intel-nuc14",
        OPENVINO_WHEEL,
        SimpleNamespace(precision="int8", providers=()),
        [
            NUC_GPU,
            (
                "OpenVINOExecutionProvider[NPU]",
                True,
                "Intel NPU (Meteor Lake) at /dev/accel/accel0: suits this int8 variant",
            ),
            NUC_OV_CPU,
            ("CPUExecutionProvider", True, NUC_CPU),
            *NO_NVIDIA,
        ],
    ),
}

NOTES = {
    "rpi4": ("Coral USB Accelerator: onnxruntime has no provider for it; convert to an Edge TPU TFLite model",),
    "rpi5-hailo": (
        "Hailo-8/8L at /dev/hailo0: onnxruntime has no provider for it; compile the model with Hailo's Dataflow "
        "Compiler and run it with HailoRT",
    ),
    "jetson-agx-orin": (
        "NVIDIA DLA x2 at /dev/nvhost-ctrl-nvdla0: reached through TensorRT with the provider options "
        "trt_dla_enable and trt_dla_core",
    ),
}


@pytest.mark.arm64
@pytest.mark.parametrize("case", sorted(RANKINGS))
def test_auto_ranking_per_device_with_reasons(case: str) -> None:
    device, runtime, variant, expected = RANKINGS[case]
    ranking = rank(RuntimeConfig(), probe(FIXTURES / device, runtime=runtime), variant)
    assert [(c.label, c.kept, c.reason) for c in ranking.candidates] == expected
    assert ranking.notes == NOTES.get(device, ())


@pytest.mark.arm64
def test_explicit_list_keeps_the_profiles_order_and_adds_cpu_last() -> None:
    runtime = validated(RuntimeConfig, providers=[{"cuda": {"device_id": 1}}, "tensorrt"])
    ranking = rank(runtime, probe(FIXTURES / "x86-rtx3060", runtime=GPU_WHEEL))
    assert [(c.label, c.kept, c.reason, c.requested) for c in ranking.candidates] == [
        ("CUDAExecutionProvider", True, "asked for (#1 in the list)", True),
        ("TensorrtExecutionProvider", True, "asked for (#2 in the list)", True),
        ("CPUExecutionProvider", True, "added last: the fallback that runs every op", False),
    ]
    assert ranking.candidates[0].options == {"device_id": "1"}


@pytest.mark.arm64
def test_explicit_cuda_on_a_pi_with_the_cpu_wheel_is_dropped_with_the_reason() -> None:
    ranking = rank(validated(RuntimeConfig, providers=["cuda", "cpu"]), probe(FIXTURES / "rpi4", runtime=CPU_WHEEL))
    assert [(c.label, c.kept, c.reason) for c in ranking.candidates] == [
        ("CPUExecutionProvider", True, "asked for (#2 in the list)"),
        (
            "CUDAExecutionProvider",
            False,
            "asked for (#1 in the list), but not in this onnxruntime 1.32.0 build (it has Azure, CPU); "
            "install onnxruntime-gpu",
        ),
    ]


@pytest.mark.arm64
def test_a_variant_built_for_tensorrt_drops_cuda_but_never_cpu() -> None:
    variant = SimpleNamespace(precision="fp16", providers=["tensorrt"])
    ranking = rank(RuntimeConfig(), probe(FIXTURES / "jetson-agx-orin", runtime=GPU_WHEEL), variant)
    assert [c.label for c in ranking.kept] == [TENSORRT, CPU]
    cuda = next(c for c in ranking.candidates if c.provider == CUDA)
    assert (cuda.kept, cuda.reason) == (False, "the fp16 variant is built for Tensorrt")


@pytest.mark.arm64
def test_provider_names_and_unknown_names() -> None:
    assert canonical_provider("openvino") == OPENVINO and canonical_provider("TRT") == TENSORRT
    assert canonical_provider("cudaexecutionprovider") == CUDA
    with pytest.raises(ValueError, match=r"unknown execution provider 'cudx' \(did you mean 'cuda'\?\)"):
        canonical_provider("cudx")


@pytest.mark.arm64
def test_device_options_caches_under_state_dir_and_cuda_device_id_passthrough(tmp_path: Path) -> None:
    trt = provider_options(Candidate(TENSORRT, {"device_id": "1", "trt_fp16_enable": "True"}, True, ""), tmp_path, 4)
    assert trt == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "cache" / "tensorrt"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path / "cache" / "tensorrt"),
    }
    assert provider_options(Candidate(CUDA, {"device_id": "2"}, True, ""), tmp_path, 4) == {"device_id": "2"}
    assert provider_options(Candidate(CUDA, {}, True, ""), tmp_path, 4) == {"device_id": "0"}
    assert provider_options(Candidate(OPENVINO, {}, True, ""), tmp_path, 4) == {
        "device_type": "CPU",
        "cache_dir": str(tmp_path / "cache" / "openvino"),
        "num_of_threads": "4",
    }
    assert "num_of_threads" not in provider_options(Candidate(OPENVINO, {"device_type": "GPU"}, True, ""), tmp_path, 4)


# ---- real sessions ----------------------------------------------------------------------------------


def this_machine(runtime: RuntimeInfo | None = None) -> Probe:
    return probe("/", runtime=runtime)


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def relu(tmp_path: Path) -> Path:
    path = tmp_path / "relu.onnx"
    path.write_bytes(unary_model().SerializeToString())
    return path


@pytest.mark.arm64
def test_auto_on_this_machine_is_a_verified_session_with_device_options(
    relu: Path, tmp_path: Path, events: list[Event]
) -> None:
    opened = open_session(relu, RuntimeConfig(), tmp_path / "state", events.append)
    assert opened.provider == opened.providers[0] == opened.session.get_providers()[0]
    assert events == [] and opened.fallbacks == []
    hw = this_machine()
    assert opened.threads == hw.cpu.physical_cores
    options = opened.session.get_session_options()
    assert options.intra_op_num_threads == opened.threads
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    if hasattr(opened.session, "get_provider_graph_assignment_info"):
        assert opened.assignment == {opened.provider: 1}
    x = np.array([[-1, 2, -3, 4]], dtype=np.float32)
    assert opened.session.run(None, {"x": x})[0].tolist() == [[0, 2, 0, 4]]


@pytest.mark.arm64
def test_cuda_asked_for_on_the_cpu_wheel_falls_back_to_cpu_with_an_event(tmp_path: Path, events: list[Event]) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA built in; the case is about the CPU wheel")
    model = linear_model(np.eye(3, dtype=np.float32)).SerializeToString()
    opened = open_session(
        model, validated(RuntimeConfig, providers=[{"cuda": {"device_id": 0}}]), tmp_path, events.append
    )
    assert opened.provider == CPU and opened.providers == (CPU,) and tuple(opened.session.get_providers()) == (CPU,)
    assert [e.type for e in events] == ["provider.fallback"]
    assert events[0].fields["provider"] == CUDA and events[0].fields["next"] == CPU
    assert (
        "not in this onnxruntime" in events[0].fields["reason"]
        and "install onnxruntime-gpu" in events[0].fields["reason"]
    )
    y = opened.session.run(None, {"x": np.ones((2, 3), np.float32)})[0]
    assert y.tolist() == [[1, 1, 1], [1, 1, 1]]


@pytest.mark.arm64
def test_require_accelerator_turns_the_fallback_into_a_loud_failure(tmp_path: Path, events: list[Event]) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA built in")
    runtime = validated(RuntimeConfig, providers=["cuda"], require_accelerator=True)
    with pytest.raises(AcceleratorUnavailableError) as err:
        open_session(add_relu_model(), runtime, tmp_path, events.append)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "runtime.require_accelerator is true, but no accelerator runs this model here (CUDAExecutionProvider: "
    )
    assert [e.type for e in events] == ["provider.fallback"] and events[0].fields["next"] is None


@pytest.mark.arm64
@pytest.mark.parametrize("asked", [CUDA, TENSORRT])
def test_a_gpu_build_without_its_libraries_is_caught_by_reading_the_session_back(
    asked: str, tmp_path: Path, events: list[Event]
) -> None:
    """onnxruntime-gpu without CUDA libraries creates a CPU session without raising: the check must notice."""
    if asked in ort.get_available_providers():
        pytest.skip(f"{asked} really is built in here")
    # A probe that believes the wheel has the GPU providers (as onnxruntime-gpu's would), on an RTX box.
    lying = probe(FIXTURES / "x86-rtx3060", runtime=GPU_WHEEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns that the provider is not available
        opened = open_session(
            add_relu_model(), validated(RuntimeConfig, providers=[asked]), tmp_path, events.append, probe=lying
        )
    assert (
        opened.provider == CPU and CPU in opened.session.get_providers() and asked not in opened.session.get_providers()
    )
    assert [(e.fields["provider"], e.fields["next"]) for e in events] == [(asked, CPU)]
    assert events[0].fields["reason"].startswith("the session came up without it (runs on CPUExecutionProvider)")


@pytest.mark.arm64
def test_require_accelerator_with_a_lying_gpu_build_fails_after_trying_each(
    tmp_path: Path, events: list[Event]
) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA really is built in here")
    lying = probe(FIXTURES / "x86-rtx3060", runtime=GPU_WHEEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            AcceleratorUnavailableError, match="TensorrtExecutionProvider: the session came up without it"
        ):
            open_session(
                add_relu_model(), RuntimeConfig(require_accelerator=True), tmp_path, events.append, probe=lying
            )
    assert [(e.fields["provider"], e.fields["next"]) for e in events] == [(TENSORRT, CUDA), (CUDA, None)]


@pytest.mark.arm64
def test_a_provider_that_takes_no_nodes_is_not_reported_as_running_the_model() -> None:
    check = Verification((OPENVINO, CPU), {CPU: 12})
    assert why_not(Candidate(OPENVINO, {}, True, ""), check) == "it took none of the model's 12 nodes"
    assert why_not(Candidate(CPU, {}, True, ""), check) is None
    assert why_not(Candidate(OPENVINO, {}, True, ""), Verification((OPENVINO, CPU), {OPENVINO: 10, CPU: 2})) is None
    assert why_not(Candidate(OPENVINO, {}, True, ""), Verification((OPENVINO, CPU), None)) is None  # runtime < 1.24


@pytest.mark.arm64
def test_an_unloadable_model_is_an_error_naming_each_provider(tmp_path: Path, events: list[Event]) -> None:
    with pytest.raises(Exception, match="no execution provider could open the model"):
        open_session(b"not a model", RuntimeConfig(), tmp_path, events.append)
    assert events[-1].fields["provider"] == CPU and "session creation failed" in events[-1].fields["reason"]


# ---- OpenVINO, for real, in its own virtualenv -----------------------------------------------------


def openvino_venv() -> str:
    """The python of the onnxruntime-openvino venv (built once), or a skip saying why there is none."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("onnxruntime-openvino has wheels for x86-64 only")
    try:
        out = subprocess.run([str(REPO / "scripts" / "openvino-venv.sh")], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not build the onnxruntime-openvino venv: {exc}")
    if out.returncode != 0:
        pytest.skip(f"could not build the onnxruntime-openvino venv: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


def in_openvino_venv(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """This repo's code run by the onnxruntime-openvino venv's python (`args` after the interpreter)."""
    return subprocess.run(
        [openvino_venv(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture(scope="module")
def openvino_python() -> str:
    return openvino_venv()


OPENVINO_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from agent.device import hardware
from agent.transport.events import Event
from agent.config.profile import RuntimeConfig
from agent.device.providers import rank
from agent.device.session import open_session
from agent.cloud.samples import sample_model

state = Path(sys.argv[1])
found = hardware.probe("/", state_dir=state)
ranking = rank(RuntimeConfig(), found)
events = []
frame = {"x": np.random.default_rng(0).standard_normal((1, 3, 480, 640)).astype(np.float32)}
opened = open_session(sample_model("ppocr-det", quiet=True), RuntimeConfig(autotune=True), state, events.append,
                      probe=found, inputs=frame)
out = opened.session.run(None, frame)[0]
print(json.dumps({
    "available": list(found.runtime.available), "cpu_vendor": found.cpu.vendor,
    "kept": [c.label for c in ranking.kept], "reasons": [c.reason for c in ranking.kept],
    "provider": opened.provider, "session_providers": list(opened.session.get_providers()),
    "assignment": opened.assignment, "autotuned": opened.autotuned, "threads": opened.threads, "notes": opened.notes,
    "events": [{"type": e.type, **e.fields} for e in events], "output_shape": list(out.shape),
    "cache": sorted(p.name for p in (state / "autotune").iterdir()),
}))
"""


@pytest.mark.slow
def test_openvino_ranks_first_on_x86_and_autotune_measures_both(openvino_python: str, tmp_path: Path) -> None:
    out = in_openvino_venv("-c", OPENVINO_SCRIPT, str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert OPENVINO in got["available"]
    assert got["kept"] == ["OpenVINOExecutionProvider[CPU]", CPU]
    assert got["reasons"][0].startswith(f"{got['cpu_vendor']} x86-64 CPU with avx")
    # Autotune timed both providers at every thread count, each verified, and chose the fastest p50.
    (tuned,) = [e for e in got["events"] if e["type"] == "provider.autotuned"]
    trials = tuned["trials"]
    assert {t["provider"] for t in trials} == {OPENVINO, CPU}
    assert all(t["error"] is None and t["verified"] == t["provider"] and t["runs"] > 0 for t in trials)
    fastest = min(trials, key=lambda t: t["p50_ms"])
    assert (tuned["provider"], tuned["threads"]) == (fastest["label"], fastest["threads"])
    # The session reported is the one read back, on the provider autotune chose.
    assert got["autotuned"] and got["threads"] == fastest["threads"]
    assert got["provider"] == fastest["provider"] == got["session_providers"][0]
    if got["assignment"] is not None:
        assert got["assignment"].get(got["provider"], 0) > 0
    assert got["output_shape"] == [1, 1, 480, 640]
    assert len(got["cache"]) == 1 and got["cache"][0].endswith("-ort1.24.1.json")


@pytest.mark.arm64
def test_require_accelerator_on_a_pi_says_why_nothing_was_ranked(tmp_path: Path, events: list[Event]) -> None:
    pi = probe(FIXTURES / "rpi4", runtime=CPU_WHEEL)
    with pytest.raises(AcceleratorUnavailableError) as err:
        open_session(add_relu_model(), RuntimeConfig(require_accelerator=True), tmp_path, events.append, probe=pi)
    assert str(err.value) == (
        "runtime.require_accelerator is true, but no accelerator runs this model here (none was ranked: "
        "TensorrtExecutionProvider: no NVIDIA GPU found; CUDAExecutionProvider: no NVIDIA GPU found; "
        "OpenVINOExecutionProvider: OpenVINO's onnxruntime wheel is for x86-64; this CPU is aarch64; "
        "AzureExecutionProvider: calls a remote endpoint; not a local inference provider)"
    )
    assert events == []
