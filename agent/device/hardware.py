"""What this device is: CPU, memory, disk, thermal zones, accelerators and the onnxruntime build.

Provider ranking decides from these facts, so they come from the kernel's own files (/proc, /sys, /dev,
/etc) read under a `root` directory: tests point it at trees captured from real devices
(tests/fixtures/hardware/). Nothing here imports a vendor SDK; a missing file means "not present".

Two facts have no file: GPU memory on a discrete NVIDIA card (only `nvidia-smi` knows it) and the
onnxruntime build. The first is read from `nvidia-smi` when probing the real machine, or from the
captured output `<root>/.commands/nvidia-smi` under a fixture root; the second is passed in, or read
from the imported onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# CPU flags that change which kernels ONNX Runtime and OpenVINO pick (x86 names as in /proc/cpuinfo).
X86_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ARM_FLAGS = ("neon", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")

# Arm's "CPU part" numbers (implementer 0x41) for the cores found on edge boards.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4f": "Neoverse-V2",
}
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0x48": "HiSilicon"}

PCI_VENDORS = {"10de": "nvidia", "8086": "intel", "1002": "amd", "1e60": "hailo", "1ac1": "google", "1f0f": "rockchip"}
# Intel NPU (intel_vpu driver) PCI device ids: Meteor Lake, Arrow Lake, Lunar Lake.
INTEL_GPU_IDS = {
    "7d55": "Intel Arc Graphics (Meteor Lake)",
    "7d45": "Intel Graphics (Meteor Lake)",
    "46a6": "Intel Iris Xe (Alder Lake-P)",
    "a7a0": "Intel Iris Xe (Raptor Lake-P)",
    "4680": "Intel UHD Graphics 770",
    "9a49": "Intel Iris Xe (Tiger Lake)",
    "46d1": "Intel UHD Graphics (Alder Lake-N)",
}
INTEL_NPU_IDS = {"7d1d": "Intel NPU (Meteor Lake)", "ad1d": "Intel NPU (Arrow Lake)", "643e": "Intel NPU (Lunar Lake)"}
# USB accelerators: Coral before and after its firmware is loaded, Hailo-8 M.2 has no USB form.
USB_ACCELERATORS = {
    ("1a6e", "089a"): ("tpu", "google", "Coral USB Accelerator (no firmware loaded)"),
    ("18d1", "9302"): ("tpu", "google", "Coral USB Accelerator"),
}


@dataclass(frozen=True)
class Cpu:
    arch: str
    vendor: str
    model: str
    flags: tuple[str, ...]
    physical_cores: int
    logical_cores: int
    max_mhz: int | None = None


@dataclass(frozen=True)
class Memory:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Disk:
    path: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ThermalZone:
    zone: str
    type: str
    celsius: float | None


@dataclass(frozen=True)
class Accelerator:
    """A device that an execution provider might use: kind is gpu, npu or tpu."""

    kind: str
    vendor: str
    name: str
    driver: str | None = None
    memory_bytes: int | None = None
    pci_id: str | None = None
    nodes: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Jetson:
    module: str
    l4t: str | None
    soc: str | None


@dataclass(frozen=True)
class EpDevice:
    ep: str
    ep_vendor: str
    device_type: str
    device_vendor: str
    vendor_id: int
    device_id: int


@dataclass(frozen=True)
class RuntimeInfo:
    """The onnxruntime build: `available` is what the wheel was built with, not what works here."""

    version: str
    available: tuple[str, ...]
    ep_devices: tuple[EpDevice, ...] = ()


@dataclass(frozen=True)
class Probe:
    root: str
    board: str | None
    cpu: Cpu
    memory: Memory | None
    disk: Disk | None
    thermal: tuple[ThermalZone, ...]
    accelerators: tuple[Accelerator, ...]
    jetson: Jetson | None
    runtime: RuntimeInfo

    def has(self, vendor: str, kind: str | None = None) -> bool:
        return any(a.vendor == vendor and (kind is None or a.kind == kind) for a in self.accelerators)

    def fingerprint(self) -> str:
        """Stable across reboots and load; changes when the silicon, drivers or runtime build change."""
        parts = {
            "arch": self.cpu.arch,
            "cpu": self.cpu.model,
            "flags": self.cpu.flags,
            "cores": [self.cpu.physical_cores, self.cpu.logical_cores],
            "board": self.board,
            "accelerators": sorted(
                [a.kind, a.vendor, a.name, a.driver or "", a.details.get("driver_version", "")]
                for a in self.accelerators
            ),
            "jetson": self.jetson.l4t if self.jetson else None,
            "runtime": [self.runtime.version, sorted(self.runtime.available)],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu"]["flags"] = list(self.cpu.flags)
        out["fingerprint"] = self.fingerprint()
        return out


class _Root:
    """Reads files under a root directory; every miss is None, never an exception."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def text(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError:
            return None

    def line(self, rel: str) -> str | None:
        """The file as one stripped line; device-tree strings end in NUL, which is dropped."""
        text = self.text(rel)
        if text is None:
            return None
        return text.replace("\x00", " ").strip() or None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except OSError:
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))


def probe(root: str | Path = "/", state_dir: str | Path | None = None, runtime: RuntimeInfo | None = None) -> Probe:
    """Everything provider ranking needs to know about this device, read under `root`."""
    fs = _Root(root)
    cpu = _cpu(fs)
    jetson = _jetson(fs)
    return Probe(
        root=str(root),
        board=_board(fs),
        cpu=cpu,
        memory=_memory(fs),
        disk=_disk(state_dir) if state_dir is not None else None,
        thermal=_thermal(fs),
        accelerators=tuple(_accelerators(fs, jetson)),
        jetson=jetson,
        runtime=runtime if runtime is not None else runtime_info(),
    )


def runtime_info() -> RuntimeInfo:
    """The imported onnxruntime: version, providers built in, and EP devices (the API exists since 1.23)."""
    import onnxruntime as ort

    devices: list[EpDevice] = []
    for d in getattr(ort, "get_ep_devices", lambda: [])():
        devices.append(
            EpDevice(
                ep=d.ep_name,
                ep_vendor=d.ep_vendor,
                device_type=str(d.device.type).rsplit(".", 1)[-1],
                device_vendor=d.device.vendor,
                vendor_id=int(d.device.vendor_id),
                device_id=int(d.device.device_id),
            )
        )
    return RuntimeInfo(
        version=ort.__version__, available=tuple(ort.get_available_providers()), ep_devices=tuple(devices)
    )


def _cpuinfo(fs: _Root) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = [{}]
    for raw in (fs.text("/proc/cpuinfo") or "").splitlines():
        if not raw.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        key, _, value = raw.partition(":")
        blocks[-1][key.strip()] = value.strip()
    return [b for b in blocks if b]


MACHINE_NAMES = {"amd64": "x86_64", "arm64": "aarch64"}


def _arch(fs: _Root, blocks: list[dict[str, str]]) -> str:
    if str(fs.root) == "/":
        # This process's own architecture decides which wheels and providers load; under emulation
        # (qemu-user) /proc still describes the host.
        machine = platform.machine()
        return MACHINE_NAMES.get(machine.lower(), machine)
    arch = fs.line("/proc/sys/kernel/arch")
    if arch:
        return arch
    first = blocks[0] if blocks else {}
    if "flags" in first:
        return "x86_64" if " lm " in f" {first['flags']} " else "i686"
    if first.get("CPU architecture") == "8":
        return "aarch64"
    if "CPU architecture" in first:
        return "armv7l"
    return "unknown"


def _cpu(fs: _Root) -> Cpu:
    blocks = _cpuinfo(fs)
    arch = _arch(fs, blocks)
    procs = [b for b in blocks if "processor" in b] or blocks
    first = procs[0] if procs else {}
    if "flags" in first:
        vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(
            first.get("vendor_id", ""), first.get("vendor_id", "unknown")
        )
        model = first.get("model name", "unknown")
        have = set(first["flags"].split())
        flags = tuple(f for f in X86_FLAGS if f in have)
    else:
        implementer = first.get("CPU implementer", "").lower()
        vendor = ARM_IMPLEMENTERS.get(implementer, implementer or "unknown")
        # big.LITTLE: name every core type, biggest part number last as the kernel lists them.
        parts = sorted({b.get("CPU part", "").lower() for b in procs if b.get("CPU part")})
        model = " + ".join(ARM_PARTS.get(p, p) for p in parts) or first.get("model name", "unknown")
        have = set(first.get("Features", "").split())
        flags = tuple(f for f in ARM_FLAGS if f in have or (f == "neon" and "asimd" in have))
    logical = _online_cpus(fs) or len(procs) or 1
    physical = _physical_cores(fs, logical, procs)
    return Cpu(
        arch=arch,
        vendor=vendor,
        model=model,
        flags=flags,
        physical_cores=physical,
        logical_cores=logical,
        max_mhz=_max_mhz(fs, first),
    )


def _cpu_range(text: str | None) -> list[int]:
    out: list[int] = []
    for part in (text or "").strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def _online_cpus(fs: _Root) -> int:
    return len(_cpu_range(fs.line("/sys/devices/system/cpu/online")))


def _physical_cores(fs: _Root, logical: int, procs: list[dict[str, str]]) -> int:
    # Hyperthreads share a core; sizing threads to logical CPUs makes them fight over one core's units.
    cores = set()
    for cpu in _cpu_range(fs.line("/sys/devices/system/cpu/online")):
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        core = fs.line(f"{base}/core_id")
        if core is not None:
            cores.add((fs.line(f"{base}/physical_package_id") or "0", fs.line(f"{base}/cluster_id") or "", core))
    if cores:
        return len(cores)
    pairs = {(b.get("physical id"), b.get("core id")) for b in procs if "core id" in b}
    return len(pairs) or logical


def _max_mhz(fs: _Root, first: dict[str, str]) -> int | None:
    khz = fs.line("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz and khz.isdigit():
        return int(khz) // 1000
    mhz = first.get("cpu MHz")
    return int(float(mhz)) if mhz else None


def _memory(fs: _Root) -> Memory | None:
    values = {}
    for raw in (fs.text("/proc/meminfo") or "").splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", raw)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    if "MemTotal" not in values:
        return None
    return Memory(total_bytes=values["MemTotal"], available_bytes=values.get("MemAvailable", values.get("MemFree", 0)))


def _disk(state_dir: str | Path) -> Disk | None:
    # The state dir may not exist yet on first start: its nearest existing parent has the same disk.
    path = Path(state_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return Disk(path=str(state_dir), free_bytes=usage.free, total_bytes=usage.total)


def _thermal(fs: _Root) -> tuple[ThermalZone, ...]:
    zones = []
    for name in fs.listdir("/sys/class/thermal"):
        if not name.startswith("thermal_zone"):
            continue
        temp = fs.line(f"/sys/class/thermal/{name}/temp")
        celsius = int(temp) / 1000 if temp and temp.lstrip("-").isdigit() else None
        zones.append(
            ThermalZone(zone=name, type=fs.line(f"/sys/class/thermal/{name}/type") or "unknown", celsius=celsius)
        )
    return tuple(sorted(zones, key=lambda z: int(re.sub(r"\D", "", z.zone) or 0)))


def _board(fs: _Root) -> str | None:
    model = fs.line("/proc/device-tree/model") or fs.line("/sys/firmware/devicetree/base/model")
    if model:
        return model
    vendor, product = fs.line("/sys/class/dmi/id/sys_vendor"), fs.line("/sys/class/dmi/id/product_name")
    return " ".join(x for x in (vendor, product) if x) or None


def _jetson(fs: _Root) -> Jetson | None:
    release = fs.line("/etc/nv_tegra_release")
    compatible = (fs.text("/proc/device-tree/compatible") or "").split("\x00")
    socs = [c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")]
    if not release and not socs:
        return None
    l4t = None
    if release:
        m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        l4t = f"{m.group(1)}.{m.group(2)}" if m else release
    module = fs.line("/proc/device-tree/model") or "NVIDIA Jetson"
    return Jetson(module=module, l4t=l4t, soc=socs[0] if socs else None)


def _uevent(fs: _Root, rel: str) -> dict[str, str]:
    out = {}
    for raw in (fs.text(rel) or "").splitlines():
        key, _, value = raw.partition("=")
        out[key] = value
    return out


def _accelerators(fs: _Root, jetson: Jetson | None) -> list[Accelerator]:
    found: list[Accelerator] = []
    smi = _nvidia_smi(fs)
    driver_version = _nvidia_driver(fs)
    dri = fs.listdir("/dev/dri")
    for slot in fs.listdir("/sys/bus/pci/devices"):
        ev = _uevent(fs, f"/sys/bus/pci/devices/{slot}/uevent")
        vendor_id, _, device_id = ev.get("PCI_ID", ":").lower().partition(":")
        pci_class = ev.get("PCI_CLASS", "").lower().rjust(6, "0")
        driver = ev.get("DRIVER")
        vendor = PCI_VENDORS.get(vendor_id)
        if vendor is None:
            continue
        pci_id = f"{vendor_id}:{device_id}"
        display = pci_class.startswith("03")
        if vendor == "nvidia" and display:
            info = _nvidia_gpu_info(fs, slot)
            name = info.get("Model") or f"NVIDIA GPU {pci_id}"
            minor = info.get("Device Minor")
            nodes = tuple(n for n in ([f"/dev/nvidia{minor}"] if minor else []) if fs.exists(n))
            details = {"pci_slot": slot}
            if driver_version:
                details["driver_version"] = driver_version
            memory = smi.get(name, {}).get("memory_bytes") if smi else None
            found.append(Accelerator("gpu", "nvidia", name, driver, memory, pci_id, nodes, details))
        elif vendor in ("intel", "amd") and display:
            nodes = tuple(f"/dev/dri/{n}" for n in _drm_nodes(fs, slot) if n in dri)
            label = INTEL_GPU_IDS.get(device_id, f"Intel GPU {pci_id}") if vendor == "intel" else f"AMD GPU {pci_id}"
            found.append(Accelerator("gpu", vendor, label, driver, None, pci_id, nodes, {"pci_slot": slot}))
        elif vendor == "intel" and (device_id in INTEL_NPU_IDS or driver == "intel_vpu"):
            nodes = tuple(f"/dev/accel/{n}" for n in fs.listdir("/dev/accel"))
            found.append(
                Accelerator(
                    "npu",
                    "intel",
                    INTEL_NPU_IDS.get(device_id, f"Intel NPU {pci_id}"),
                    driver,
                    None,
                    pci_id,
                    nodes,
                    {"pci_slot": slot},
                )
            )
        elif vendor == "hailo":
            nodes = tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n.startswith("hailo"))
            found.append(
                Accelerator(
                    "npu",
                    "hailo",
                    "Hailo-8/8L" if device_id == "2864" else f"Hailo {pci_id}",
                    driver,
                    None,
                    pci_id,
                    nodes,
                    {"pci_slot": slot},
                )
            )
        elif vendor == "google":
            nodes = tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n.startswith("apex_"))
            found.append(
                Accelerator("tpu", "google", "Coral Edge TPU (PCIe)", driver, None, pci_id, nodes, {"pci_slot": slot})
            )
    for dev in fs.listdir("/sys/bus/usb/devices"):
        key = (
            fs.line(f"/sys/bus/usb/devices/{dev}/idVendor") or "",
            fs.line(f"/sys/bus/usb/devices/{dev}/idProduct") or "",
        )
        if key in USB_ACCELERATORS:
            kind, vendor, name = USB_ACCELERATORS[key]
            found.append(Accelerator(kind, vendor, name, None, None, ":".join(key), (), {"usb_port": dev}))
    if jetson is not None:
        found.extend(_jetson_accelerators(fs, jetson, driver_version))
    rknpu = _rockchip_npu(fs)
    if rknpu is not None:
        found.append(rknpu)
    return found


def _drm_nodes(fs: _Root, slot: str) -> list[str]:
    names = fs.listdir(f"/sys/bus/pci/devices/{slot}/drm")
    return [n for n in names if n.startswith(("card", "renderD"))]


def _nvidia_driver(fs: _Root) -> str | None:
    text = fs.text("/proc/driver/nvidia/version") or ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", text)
    return m.group(1) if m else None


def _nvidia_gpu_info(fs: _Root, slot: str) -> dict[str, str]:
    info = {}
    for raw in (fs.text(f"/proc/driver/nvidia/gpus/{slot}/information") or "").splitlines():
        key, _, value = raw.partition(":")
        info[key.strip()] = value.strip()
    return info


def _nvidia_smi(fs: _Root) -> dict[str, dict[str, Any]]:
    """GPU name -> memory, from `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`."""
    if str(fs.root) == "/":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return {}
        try:
            text = subprocess.run(
                [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    else:
        text = fs.text("/.commands/nvidia-smi") or ""
    out = {}
    for raw in text.splitlines():
        name, _, mib = raw.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            out[name.strip()] = {"memory_bytes": int(mib) * 1024**2}
    return out


def _jetson_accelerators(fs: _Root, jetson: Jetson, driver: str | None) -> list[Accelerator]:
    gpu_nodes = tuple(n for n in ("/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-gpu", "/dev/nvhost-ctrl-gpu") if fs.exists(n))
    # The Jetson GPU shares the module's memory: its size is the system's.
    details = {"memory": "shared with the CPU"}
    if jetson.l4t:
        details["l4t"] = jetson.l4t
    out = [
        Accelerator(
            "gpu",
            "nvidia",
            f"{jetson.module.removesuffix(' Developer Kit')} integrated GPU ({jetson.soc or 'tegra'})",
            "nvgpu",
            None,
            None,
            gpu_nodes,
            details,
        )
    ]
    dla = sorted(n for n in fs.listdir("/dev") if re.fullmatch(r"nvhost-(ctrl-)?nvdla\d", n))
    if dla:
        out.append(
            Accelerator(
                "npu",
                "nvidia",
                f"NVIDIA DLA x{len({n[-1] for n in dla})}",
                "nvdla",
                None,
                None,
                tuple(f"/dev/{n}" for n in dla),
                {"use": "through TensorRT (trt_dla_enable)"},
            )
        )
    return out


def _rockchip_npu(fs: _Root) -> Accelerator | None:
    compatible = (fs.text("/proc/device-tree/compatible") or "").split("\x00")
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("rockchip,rk35")), None)
    nodes = tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n == "rknpu")
    version = fs.line("/sys/kernel/debug/rknpu/version") or fs.line("/sys/module/rknpu/version")
    if soc is None and not nodes and version is None:
        return None
    details = {"driver_version": version} if version else {}
    return Accelerator("npu", "rockchip", f"Rockchip NPU ({soc or 'rk'})", "rknpu", None, None, nodes, details)
