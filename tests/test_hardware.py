"""The hardware probe against /proc, /sys and /dev trees captured from real device types, and this machine."""

from __future__ import annotations

import platform
from pathlib import Path

import onnxruntime as ort
import pytest

from agent.device.hardware import Probe, RuntimeInfo, probe

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CPU_WHEEL = RuntimeInfo("1.32.0", ("AzureExecutionProvider", "CPUExecutionProvider"))


def fixture(name: str, runtime: RuntimeInfo = CPU_WHEEL) -> Probe:
    return probe(FIXTURES / name, runtime=runtime)


# name: (arch, vendor, cpu model, physical, logical, max MHz, flags, board, memory GiB (int), thermal zones)
CPUS = {
    "rpi4": ("aarch64", "ARM", "Cortex-A72", 4, 4, 1800, ("neon",), "Raspberry Pi 4 Model B Rev 1.4", 3, 1),
    "rpi5-hailo": (
        "aarch64",
        "ARM",
        "Cortex-A76",
        4,
        4,
        2400,
        ("neon", "asimdhp", "asimddp"),
        "Raspberry Pi 5 Model B Rev 1.0",
        7,
        1,
    ),
    "jetson-agx-orin": (
        "aarch64",
        "ARM",
        "Cortex-A78AE",
        12,
        12,
        2201,
        ("neon", "asimdhp", "asimddp"),
        "NVIDIA Jetson AGX Orin Developer Kit",
        61,
        9,
    ),
    "x86-rtx3060": (
        "x86_64",
        "Intel",
        "12th Gen Intel(R) Core(TM) i7-12700F",
        12,
        20,
        4900,
        ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni"),
        "Micro-Star International Co., Ltd. MS-7D25",
        31,
        2,
    ),
    "intel-nuc14": (
        "x86_64",
        "Intel",
        "Intel(R) Core(TM) Ultra 7 155H",
        16,
        22,
        4800,
        ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni"),
        "ASUSTeK COMPUTER INC. NUC14RVH",
        30,
        5,
    ),
}

# name: [(kind, vendor, name, driver, memory bytes, nodes)]
ACCELERATORS = {
    "rpi4": [("tpu", "google", "Coral USB Accelerator", None, None, ())],
    "rpi5-hailo": [("npu", "hailo", "Hailo-8/8L", "hailo", None, ("/dev/hailo0",))],
    "jetson-agx-orin": [
        (
            "gpu",
            "nvidia",
            "NVIDIA Jetson AGX Orin integrated GPU (tegra234)",
            "nvgpu",
            None,
            ("/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-gpu", "/dev/nvhost-ctrl-gpu"),
        ),
        (
            "npu",
            "nvidia",
            "NVIDIA DLA x2",
            "nvdla",
            None,
            ("/dev/nvhost-ctrl-nvdla0", "/dev/nvhost-ctrl-nvdla1", "/dev/nvhost-nvdla0", "/dev/nvhost-nvdla1"),
        ),
    ],
    "x86-rtx3060": [("gpu", "nvidia", "NVIDIA GeForce RTX 3060", "nvidia", 12 * 1024**3, ("/dev/nvidia0",))],
    "intel-nuc14": [
        ("gpu", "intel", "Intel Arc Graphics (Meteor Lake)", "i915", None, ("/dev/dri/card1", "/dev/dri/renderD128")),
        ("npu", "intel", "Intel NPU (Meteor Lake)", "intel_vpu", None, ("/dev/accel/accel0",)),
    ],
}


@pytest.mark.arm64
@pytest.mark.parametrize("name", sorted(CPUS))
def test_cpu_memory_board_and_thermal_from_captured_trees(name: str) -> None:
    arch, vendor, model, physical, logical, mhz, flags, board, mem_gib, zones = CPUS[name]
    found = fixture(name)
    assert (found.cpu.arch, found.cpu.vendor, found.cpu.model) == (arch, vendor, model)
    assert (found.cpu.physical_cores, found.cpu.logical_cores, found.cpu.max_mhz) == (physical, logical, mhz)
    assert found.cpu.flags == flags
    assert found.board == board
    assert found.memory is not None and found.memory.total_bytes // 1024**3 == mem_gib
    assert 0 < found.memory.available_bytes < found.memory.total_bytes
    assert len(found.thermal) == zones and all(z.celsius is not None and 15 < z.celsius < 90 for z in found.thermal)


@pytest.mark.arm64
@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_accelerators_from_captured_trees(name: str) -> None:
    found = fixture(name)
    got = [(a.kind, a.vendor, a.name, a.driver, a.memory_bytes, a.nodes) for a in found.accelerators]
    assert got == ACCELERATORS[name]


@pytest.mark.arm64
def test_jetson_release_module_and_soc() -> None:
    found = fixture("jetson-agx-orin")
    assert found.jetson is not None
    assert (found.jetson.module, found.jetson.l4t, found.jetson.soc) == (
        "NVIDIA Jetson AGX Orin Developer Kit",
        "36.3.0",
        "tegra234",
    )
    assert [z.type for z in found.thermal][:2] == ["cpu-thermal", "gpu-thermal"]
    assert fixture("rpi5-hailo").jetson is None


@pytest.mark.arm64
def test_nvidia_driver_version_and_pci_identity() -> None:
    (gpu,) = fixture("x86-rtx3060").accelerators
    assert gpu.pci_id == "10de:2504" and gpu.details == {"pci_slot": "0000:01:00.0", "driver_version": "550.54.14"}


@pytest.mark.arm64
def test_raspberry_pi_4_architecture_from_cpuinfo_when_kernel_arch_file_is_absent() -> None:
    # The Pi 4 capture comes from a kernel without /proc/sys/kernel/arch: "CPU architecture: 8" says aarch64.
    assert not (FIXTURES / "rpi4" / "proc" / "sys" / "kernel" / "arch").exists()
    assert fixture("rpi4").cpu.arch == "aarch64"


@pytest.mark.arm64
def test_an_empty_root_is_a_probe_of_nothing_not_an_error(tmp_path: Path) -> None:
    found = probe(tmp_path, runtime=CPU_WHEEL)
    assert (found.cpu.arch, found.cpu.physical_cores, found.cpu.logical_cores) == ("unknown", 1, 1)
    assert found.memory is None and found.accelerators == () and found.thermal == () and found.board is None


@pytest.mark.arm64
def test_fingerprint_is_stable_and_tells_devices_and_runtimes_apart() -> None:
    prints = {name: fixture(name).fingerprint() for name in CPUS}
    assert len(set(prints.values())) == len(CPUS)
    assert fixture("rpi4").fingerprint() == prints["rpi4"]
    gpu_wheel = RuntimeInfo("1.32.0", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert fixture("x86-rtx3060", gpu_wheel).fingerprint() != prints["x86-rtx3060"]


@pytest.mark.arm64
def test_disk_is_measured_on_the_state_dirs_nearest_existing_parent(tmp_path: Path) -> None:
    found = probe(FIXTURES / "rpi4", state_dir=tmp_path / "not" / "yet", runtime=CPU_WHEEL)
    assert found.disk is not None and found.disk.path == str(tmp_path / "not" / "yet")
    assert 0 < found.disk.free_bytes <= found.disk.total_bytes


@pytest.mark.arm64
def test_probe_of_this_machine_reports_its_own_architecture_and_runtime(tmp_path: Path) -> None:
    found = probe("/", state_dir=tmp_path)
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    assert found.cpu.arch == machine
    assert 1 <= found.cpu.physical_cores <= found.cpu.logical_cores
    assert found.memory is not None and found.memory.total_bytes > 256 * 1024**2
    assert found.runtime.version == ort.__version__
    assert found.runtime.available == tuple(ort.get_available_providers())
    if hasattr(ort, "get_ep_devices"):
        assert any(d.ep == "CPUExecutionProvider" and d.device_type == "CPU" for d in found.runtime.ep_devices)
    if machine == "x86_64":
        assert found.cpu.vendor in ("Intel", "AMD") and "sse4_2" in found.cpu.flags
    doc = found.to_dict()
    assert doc["fingerprint"] == found.fingerprint() and doc["cpu"]["arch"] == machine


def test_a_capture_of_this_machine_probes_the_same_as_the_machine(tmp_path: Path) -> None:
    """The fixture trees stand for real devices only if a copied tree reads like the live one."""
    import glob

    patterns = [
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/proc/sys/kernel/arch",
        "/proc/device-tree/model",
        "/proc/device-tree/compatible",
        "/proc/driver/nvidia/version",
        "/proc/driver/nvidia/gpus/*/information",
        "/etc/nv_tegra_release",
        "/sys/devices/system/cpu/online",
        "/sys/devices/system/cpu/cpu*/topology/*_id",
        "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
        "/sys/class/thermal/thermal_zone*/type",
        "/sys/class/dmi/id/sys_vendor",
        "/sys/class/dmi/id/product_name",
        "/sys/bus/pci/devices/*/uevent",
        "/sys/bus/pci/devices/*/drm/*/dev",
        "/sys/bus/usb/devices/*/idVendor",
        "/sys/bus/usb/devices/*/idProduct",
    ]
    for pattern in patterns:
        for name in glob.glob(pattern):
            try:
                data = Path(name).read_bytes()
            except OSError:
                continue
            target = tmp_path / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    live = probe("/")
    copy = probe(tmp_path, runtime=live.runtime)
    assert copy.cpu == live.cpu
    assert copy.board == live.board and copy.jetson == live.jetson
    assert copy.memory is not None and live.memory is not None and copy.memory.total_bytes == live.memory.total_bytes
    assert [(a.kind, a.vendor, a.name, a.pci_id) for a in copy.accelerators] == [
        (a.kind, a.vendor, a.name, a.pci_id) for a in live.accelerators
    ]
