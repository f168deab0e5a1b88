"""Accelerators an execution provider might use, found in the kernel's files: PCI and USB devices,
a Jetson's integrated GPU and DLA, a Rockchip NPU. No vendor SDK is imported; a missing file means
"not present".

GPU memory on a discrete NVIDIA card has no file: only `nvidia-smi` knows it. It is read from
`nvidia-smi` when probing the real machine, or from the captured output `<root>/.commands/nvidia-smi`
under a fixture root.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from typing import Literal

from agent.device.sysroot import SysRoot

Kind = Literal["gpu", "npu", "tpu"]

PCI_VENDORS = {"10de": "nvidia", "8086": "intel", "1002": "amd", "1e60": "hailo", "1ac1": "google", "1f0f": "rockchip"}
# Intel integrated GPU PCI device ids, for names a person recognises.
INTEL_GPU_IDS = {
    "7d55": "Intel Arc Graphics (Meteor Lake)",
    "7d45": "Intel Graphics (Meteor Lake)",
    "46a6": "Intel Iris Xe (Alder Lake-P)",
    "a7a0": "Intel Iris Xe (Raptor Lake-P)",
    "4680": "Intel UHD Graphics 770",
    "9a49": "Intel Iris Xe (Tiger Lake)",
    "46d1": "Intel UHD Graphics (Alder Lake-N)",
}
# Intel NPU (intel_vpu driver) PCI device ids: Meteor Lake, Arrow Lake, Lunar Lake.
INTEL_NPU_IDS = {"7d1d": "Intel NPU (Meteor Lake)", "ad1d": "Intel NPU (Arrow Lake)", "643e": "Intel NPU (Lunar Lake)"}
# USB accelerators: Coral before and after its firmware is loaded, Hailo-8 M.2 has no USB form.
USB_ACCELERATORS: dict[tuple[str, str], tuple[Kind, str, str]] = {
    ("1a6e", "089a"): ("tpu", "google", "Coral USB Accelerator (no firmware loaded)"),
    ("18d1", "9302"): ("tpu", "google", "Coral USB Accelerator"),
}


@dataclass(frozen=True)
class Accelerator:
    """A device that an execution provider might use: kind is gpu, npu or tpu."""

    kind: Kind
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


def read_jetson(fs: SysRoot) -> Jetson | None:
    """The Jetson module, from L4T's release file and the device tree; None on any other board."""
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


def _uevent(fs: SysRoot, rel: str) -> dict[str, str]:
    out = {}
    for raw in (fs.text(rel) or "").splitlines():
        key, _, value = raw.partition("=")
        out[key] = value
    return out


def find(fs: SysRoot, jetson: Jetson | None) -> list[Accelerator]:
    """Every accelerator under the root, PCI first, then USB, Jetson and Rockchip."""
    smi = _nvidia_smi(fs)
    driver_version = _nvidia_driver(fs)
    dri = fs.listdir("/dev/dri")
    found = [
        a for slot in fs.listdir("/sys/bus/pci/devices") if (a := _pci(fs, slot, dri, smi, driver_version)) is not None
    ]
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


def _pci(fs: SysRoot, slot: str, dri: list[str], smi: dict[str, int], driver_version: str | None) -> Accelerator | None:
    ev = _uevent(fs, f"/sys/bus/pci/devices/{slot}/uevent")
    vendor_id, _, device_id = ev.get("PCI_ID", ":").lower().partition(":")
    pci_class = ev.get("PCI_CLASS", "").lower().rjust(6, "0")
    driver = ev.get("DRIVER")
    vendor = PCI_VENDORS.get(vendor_id)
    pci_id = f"{vendor_id}:{device_id}"
    display = pci_class.startswith("03")
    details = {"pci_slot": slot}
    kind: Kind
    if vendor == "nvidia" and display:
        info = _nvidia_gpu_info(fs, slot)
        name = info.get("Model") or f"NVIDIA GPU {pci_id}"
        minor = info.get("Device Minor")
        nodes = tuple(n for n in ([f"/dev/nvidia{minor}"] if minor else []) if fs.exists(n))
        if driver_version:
            details["driver_version"] = driver_version
        return Accelerator("gpu", "nvidia", name, driver, smi.get(name), pci_id, nodes, details)
    if vendor in ("intel", "amd") and display:
        kind, nodes = "gpu", tuple(f"/dev/dri/{n}" for n in _drm_nodes(fs, slot) if n in dri)
        name = INTEL_GPU_IDS.get(device_id, f"Intel GPU {pci_id}") if vendor == "intel" else f"AMD GPU {pci_id}"
    elif vendor == "intel" and (device_id in INTEL_NPU_IDS or driver == "intel_vpu"):
        kind, nodes = "npu", tuple(f"/dev/accel/{n}" for n in fs.listdir("/dev/accel"))
        name = INTEL_NPU_IDS.get(device_id, f"Intel NPU {pci_id}")
    elif vendor == "hailo":
        kind, nodes = "npu", tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n.startswith("hailo"))
        name = "Hailo-8/8L" if device_id == "2864" else f"Hailo {pci_id}"
    elif vendor == "google":
        kind, nodes = "tpu", tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n.startswith("apex_"))
        name = "Coral Edge TPU (PCIe)"
    else:
        return None
    return Accelerator(kind, vendor, name, driver, None, pci_id, nodes, details)


def _drm_nodes(fs: SysRoot, slot: str) -> list[str]:
    names = fs.listdir(f"/sys/bus/pci/devices/{slot}/drm")
    return [n for n in names if n.startswith(("card", "renderD"))]


def _nvidia_driver(fs: SysRoot) -> str | None:
    text = fs.text("/proc/driver/nvidia/version") or ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", text)
    return m.group(1) if m else None


def _nvidia_gpu_info(fs: SysRoot, slot: str) -> dict[str, str]:
    info = {}
    for raw in (fs.text(f"/proc/driver/nvidia/gpus/{slot}/information") or "").splitlines():
        key, _, value = raw.partition(":")
        info[key.strip()] = value.strip()
    return info


def _nvidia_smi(fs: SysRoot) -> dict[str, int]:
    """GPU name -> memory bytes, from `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`."""
    if str(fs.root) == "/":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return {}
        import subprocess  # here: a start probes on its way to the first result, and only NVIDIA hosts run it

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
            out[name.strip()] = int(mib) * 1024**2
    return out


def _jetson_accelerators(fs: SysRoot, jetson: Jetson, driver: str | None) -> list[Accelerator]:
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


def _rockchip_npu(fs: SysRoot) -> Accelerator | None:
    compatible = (fs.text("/proc/device-tree/compatible") or "").split("\x00")
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("rockchip,rk35")), None)
    nodes = tuple(f"/dev/{n}" for n in fs.listdir("/dev") if n == "rknpu")
    version = fs.line("/sys/kernel/debug/rknpu/version") or fs.line("/sys/module/rknpu/version")
    if soc is None and not nodes and version is None:
        return None
    details = {"driver_version": version} if version else {}
    return Accelerator("npu", "rockchip", f"Rockchip NPU ({soc or 'rk'})", "rknpu", None, None, nodes, details)
