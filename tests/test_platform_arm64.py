"""The arm64 suite really runs on aarch64: interpreter, onnxruntime build, CPU features, provider ranking.

These run in the main suite too (on an x86-64 host they check that the build matches the machine);
under scripts/test-arm64.sh (EDGE_AGENT_EMULATED=1) they prove that the emulation is aarch64 from the
interpreter down to the onnxruntime library, and that the hardware probe and the provider ranking see
an ARM CPU as they would on a Raspberry Pi.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.platform import EMULATED, elf_machine, hwcap_features, skip_if_emulated

pytestmark = pytest.mark.arm64

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hardware"
on_aarch64 = pytest.mark.skipif(platform.machine() != "aarch64", reason="reads arm64 hwcaps: only on aarch64")


def ort_library() -> Path:
    """The onnxruntime extension module this process loaded (the C++ runtime linked into it)."""
    from onnxruntime.capi import onnxruntime_pybind11_state

    return Path(onnxruntime_pybind11_state.__file__)


def test_interpreter_and_onnxruntime_are_built_for_this_machine() -> None:
    machine = platform.machine()
    if EMULATED:
        assert machine == "aarch64", f"EDGE_AGENT_EMULATED=1 but platform.machine() is {machine}"
    assert elf_machine(ort_library()) == machine, f"{ort_library()} is not built for {machine}"
    try:
        from numpy._core import _multiarray_umath  # numpy 2
    except ImportError:
        from numpy.core import _multiarray_umath  # type: ignore[no-redef]  # numpy 1 names it numpy.core

    assert elf_machine(_multiarray_umath.__file__) == machine


def test_a_tiny_model_runs_on_the_cpu_provider(tmp_path: Path) -> None:
    import onnxruntime as ort

    from tests.helpers.models import linear_model, save

    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    path = save(linear_model(weights, np.ones(3, dtype=np.float32)), tmp_path / "linear.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    with warnings.catch_warnings():
        # qemu's default CPU made OpenBLAS pick kernels that raise false floating-point warnings.
        warnings.simplefilter("error")
        expected = x @ weights + 1
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, expected, rtol=1e-5)


@on_aarch64
def test_probe_reports_the_arm_cpu_and_its_features() -> None:
    from agent.device import hardware

    hwcaps = set(hwcap_features())
    assert {"fp", "asimd"} <= hwcaps, f"an aarch64 CPU without NEON? hwcaps: {sorted(hwcaps)}"
    found = hardware.probe()
    assert found.cpu.arch == "aarch64"
    assert found.cpu.vendor != "unknown", found.cpu  # Arm's own cores say "ARM"; NVIDIA Carmel says "NVIDIA"
    # The probe reads /proc/cpuinfo; its Features must be what the kernel (or qemu) tells this process.
    expected = {f for f in hardware.ARM_FLAGS if f in hwcaps or (f == "neon" and "asimd" in hwcaps)}
    assert set(found.cpu.flags) == expected, (found.cpu.flags, sorted(hwcaps))
    assert "CPUExecutionProvider" in found.runtime.available
    if EMULATED:
        from tests.helpers.platform import QEMU_CPUS

        qemu_cpu = os.environ.get("EDGE_AGENT_QEMU_CPU", "neoverse-n1")
        assert found.cpu.vendor == "ARM"
        assert found.cpu.model == hardware.ARM_PARTS[QEMU_CPUS[qemu_cpu]["part"]]
        if qemu_cpu in ("neoverse-n1", "cortex-a76"):
            assert {"neon", "asimdhp", "asimddp"} <= set(found.cpu.flags)


@on_aarch64
def test_providers_are_ranked_as_on_a_raspberry_pi() -> None:
    """Here and on a captured Raspberry Pi 4, with this onnxruntime build: the same providers, in order."""
    from agent.config.profile import RuntimeConfig
    from agent.device import hardware, providers

    here = hardware.probe()
    pi = hardware.probe(FIXTURES / "rpi4", runtime=here.runtime)
    assert pi.cpu.arch == here.cpu.arch == "aarch64"
    ranked_here = providers.rank(RuntimeConfig(), here)
    ranked_pi = providers.rank(RuntimeConfig(), pi)
    assert [c.label for c in ranked_here.kept] == [c.label for c in ranked_pi.kept]
    assert ranked_here.kept[-1].provider == "CPUExecutionProvider"


def test_mqtt_round_trip_through_the_host_broker(broker) -> None:
    """paho on this interpreter, Mosquitto from the host: the broker fixture works under emulation too."""
    import paho.mqtt.client as mqtt

    topic = f"arm64/{uuid.uuid4().hex}"
    got: list[bytes] = []
    subscribed, received = threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, msg: (got.append(msg.payload), received.set())
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(30)
        client.publish(topic, platform.machine().encode(), qos=1)
        assert received.wait(30)
    finally:
        client.loop_stop()
        client.disconnect()
    assert got == [platform.machine().encode()]


def test_a_subprocess_of_sys_executable_runs_on_the_same_machine() -> None:
    """Under emulation sys.executable is a host wrapper that starts the emulated Python again."""
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.machine())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert out == platform.machine()


@skip_if_emulated("shows how a test that cannot run under qemu is skipped, with this reason in the report")
def test_skip_helper_skips_under_emulation_only() -> None:
    assert not EMULATED
