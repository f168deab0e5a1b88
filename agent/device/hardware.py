"""What this device is: CPU, memory, disk, thermal zones, accelerators and the onnxruntime build.

Provider ranking decides from these facts, so they come from the kernel's own files (/proc, /sys, /dev,
/etc) read under a `root` directory (agent.device.sysroot): tests point it at trees captured from real
devices (tests/fixtures/hardware/). Accelerators are found by agent.device.accelerators. The
onnxruntime build has no file: it is passed in, or read from the imported onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.device import accelerators
from agent.device.accelerators import Accelerator, Jetson
from agent.device.sysroot import SysRoot
from agent.util.hashing import sha256_bytes

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
class CpuBudget:
    """The CPUs this process may really use, which thread pools are sized to: the affinity mask (taskset,
    cpuset) and the cgroup's CPU quota (a container's `--cpus`), not the host's core count."""

    usable: int  # whole CPUs, at least 1: the device's one thread budget
    affinity: int | None  # CPUs in the affinity mask; None when unknown
    quota: float | None  # CPUs the cgroup quota allows (quota / period); None when unlimited
    limited_by: str  # "affinity", "cgroup quota" or "online CPUs"


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
    budget: CpuBudget | None = None  # left out of the fingerprint: a quota is not the silicon

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
        return sha256_bytes(json.dumps(parts, sort_keys=True).encode())[:16]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu"]["flags"] = list(self.cpu.flags)
        out["fingerprint"] = self.fingerprint()
        return out


def probe(root: str | Path = "/", state_dir: str | Path | None = None, runtime: RuntimeInfo | None = None) -> Probe:
    """Everything provider ranking needs to know about this device, read under `root`."""
    fs = SysRoot(root)
    cpu = _cpu(fs)
    jetson = accelerators.read_jetson(fs)
    return Probe(
        root=str(root),
        board=_board(fs),
        cpu=cpu,
        memory=_memory(fs),
        disk=_disk(state_dir) if state_dir is not None else None,
        thermal=_thermal(fs),
        accelerators=tuple(accelerators.find(fs, jetson)),
        jetson=jetson,
        runtime=runtime if runtime is not None else runtime_info(),
        budget=cpu_budget(fs, cpu.logical_cores),
    )


def cpu_budget(fs: SysRoot | None = None, online: int | None = None) -> CpuBudget:
    """The CPUs this process may use: the fewest of the online CPUs, the affinity mask and the cgroup
    quota (v2 `cpu.max` or v1 `cpu.cfs_quota_us`, the tightest along the cgroup's ancestors). A
    fractional quota rounds down (at least 1): a pool one thread wider than the quota is throttled in
    every period, which costs more latency than the thread gains."""
    fs = fs if fs is not None else SysRoot("/")
    if online is None:
        online = _online_cpus(fs) or os.cpu_count() or 1
    affinity = _affinity(fs)
    quota = _cgroup_quota(fs)
    usable, limited_by = online, "online CPUs"
    if affinity is not None and affinity < usable:
        usable, limited_by = affinity, "affinity"
    if quota is not None and max(1, math.floor(quota)) < usable:
        usable, limited_by = max(1, math.floor(quota)), "cgroup quota"
    return CpuBudget(usable=max(1, usable), affinity=affinity, quota=quota, limited_by=limited_by)


def _affinity(fs: SysRoot) -> int | None:
    if str(fs.root) == "/" and hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    for raw in (fs.text("/proc/self/status") or "").splitlines():
        if raw.startswith("Cpus_allowed_list:"):
            return len(_cpu_range(raw.split(":", 1)[1])) or None
    return None


def _ancestors(path: str) -> list[str]:
    """`/a/b` -> [`/a/b`, `/a`, ``]: a container sees its own cgroup at the mount's root, whatever
    /proc/self/cgroup names, so every level that exists is read and the tightest wins."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) if i else "" for i in range(len(parts), -1, -1)]


def _cgroup_quota(fs: SysRoot) -> float | None:
    found: list[float] = []
    for raw in (fs.text("/proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = raw.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2: mounted at /sys/fs/cgroup, or .../unified in hybrid mode
            mount = "/sys/fs/cgroup" if fs.exists("/sys/fs/cgroup/cgroup.controllers") else "/sys/fs/cgroup/unified"
            for level in _ancestors(path):
                fields = (fs.line(f"{mount}{level}/cpu.max") or "max").split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
                    found.append(int(fields[0]) / int(fields[1]))
        elif "cpu" in controllers.split(","):
            for mount in {f"/sys/fs/cgroup/{controllers}", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}:
                for level in _ancestors(path):
                    quota = fs.line(f"{mount}{level}/cpu.cfs_quota_us")
                    period = fs.line(f"{mount}{level}/cpu.cfs_period_us")
                    if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:
                        found.append(int(quota) / int(period))  # -1 (unlimited) is not all digits
    return min(found) if found else None


def runtime_info() -> RuntimeInfo:
    """The imported onnxruntime: version, providers built in, and EP devices (the API exists since 1.23)."""
    import onnxruntime as ort  # here: a probe of a captured tree with a given RuntimeInfo never loads it

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


def _cpuinfo(fs: SysRoot) -> list[dict[str, str]]:
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


def _arch(fs: SysRoot, blocks: list[dict[str, str]]) -> str:
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


def _cpu(fs: SysRoot) -> Cpu:
    blocks = _cpuinfo(fs)
    arch = _arch(fs, blocks)
    procs = _processors(blocks)
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
    physical = _physical_cores(fs, logical, lambda: procs)
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


def _online_cpus(fs: SysRoot) -> int:
    return len(_cpu_range(fs.line("/sys/devices/system/cpu/online")))


def physical_cores(fs: SysRoot | None = None) -> int:
    """The online CPUs' cores, hyperthreads counted once, as the probe counts them; what a start sizes its
    threads by before it probes (psutil's count would put psutil's import, 13 ms, on the way to the first
    result)."""
    fs = fs if fs is not None else SysRoot("/")
    return _physical_cores(fs, _online_cpus(fs) or os.cpu_count() or 1, lambda: _processors(_cpuinfo(fs)))


def available_memory(fs: SysRoot | None = None) -> int | None:
    """Bytes of memory available now (the kernel's MemAvailable), or None where /proc/meminfo is missing."""
    memory = _memory(fs if fs is not None else SysRoot("/"))
    return memory.available_bytes if memory is not None else None


def _processors(blocks: list[dict[str, str]]) -> list[dict[str, str]]:
    return [b for b in blocks if "processor" in b] or blocks


def _physical_cores(fs: SysRoot, logical: int, procs: Callable[[], list[dict[str, str]]]) -> int:
    # Hyperthreads share a core; sizing threads to logical CPUs makes them fight over one core's units.
    # /proc/cpuinfo (`procs`) is read only where sysfs has no topology.
    cores = set()
    for cpu in _cpu_range(fs.line("/sys/devices/system/cpu/online")):
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        core = fs.line(f"{base}/core_id")
        if core is not None:
            cores.add((fs.line(f"{base}/physical_package_id") or "0", fs.line(f"{base}/cluster_id") or "", core))
    if cores:
        return len(cores)
    pairs = {(b.get("physical id"), b.get("core id")) for b in procs() if "core id" in b}
    return len(pairs) or logical


def _max_mhz(fs: SysRoot, first: dict[str, str]) -> int | None:
    khz = fs.line("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz and khz.isdigit():
        return int(khz) // 1000
    mhz = first.get("cpu MHz")
    return int(float(mhz)) if mhz else None


def _memory(fs: SysRoot) -> Memory | None:
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


def _thermal(fs: SysRoot) -> tuple[ThermalZone, ...]:
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


def _board(fs: SysRoot) -> str | None:
    model = fs.line("/proc/device-tree/model") or fs.line("/sys/firmware/devicetree/base/model")
    if model:
        return model
    vendor, product = fs.line("/sys/class/dmi/id/sys_vendor"), fs.line("/sys/class/dmi/id/product_name")
    return " ".join(x for x in (vendor, product) if x) or None
