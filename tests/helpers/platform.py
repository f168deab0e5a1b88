"""Where the tests run: native or under qemu-user emulation (scripts/test-arm64.sh), and what the CPU offers.

scripts/test-arm64.sh sets EDGE_AGENT_EMULATED=1 (and EDGE_AGENT_QEMU_CPU) when it runs the arm64-marked
tests on an aarch64 Python under qemu-aarch64-static. What works there and what does not:

- subprocesses of sys.executable work: sys.executable is a small host wrapper that starts the emulated
  Python again (several seconds per start, so keep such tests few);
- host x86-64 programs (mosquitto, openssl) run natively: the `broker` fixtures work unchanged;
- aarch64 programs other than the Python wrapper cannot be executed (no binfmt_misc): "Exec format error";
- float kernels are 100-250x slower than native: only tiny models, no benchmarks, no timing asserts.

Use `skip_if_emulated(reason)` for the rest, e.g.
    pytestmark = [pytest.mark.arm64]
    @skip_if_emulated("times inference: meaningless under qemu")
    def test_latency_budget(): ...

Do not run this file as a script: its name shadows the standard library's `platform` module.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

#: True when the tests run under qemu-user emulation (set by scripts/test-arm64.sh).
EMULATED = os.environ.get("EDGE_AGENT_EMULATED") == "1"


def skip_if_emulated(reason: str) -> Any:
    """Skip a test (or a module, as pytestmark) under qemu emulation, saying why in the report."""
    import pytest  # here, not at the top: scripts/test-arm64.sh uses this module before pytest is installed

    return pytest.mark.skipif(EMULATED, reason=f"under qemu-aarch64 emulation: {reason}")


# Linux arm64 hwcap names, in bit order of AT_HWCAP and AT_HWCAP2 (arch/arm64/kernel/cpuinfo.c); these are
# the words on the "Features" line of /proc/cpuinfo.
HWCAP_NAMES = (
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
    "dit",
    "uscat",
    "ilrcpc",
    "flagm",
    "ssbs",
    "sb",
    "paca",
    "pacg",
)
HWCAP2_NAMES = (
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
    "dgh",
    "rng",
    "bti",
    "mte",
    "ecv",
    "afp",
    "rpres",
    "mte3",
    "sme",
    "smei16i64",
    "smef64f64",
    "smei8i32",
    "smef16f32",
    "smeb16f32",
    "smef32f32",
    "smefa64",
    "wfxt",
    "ebf16",
    "sveebf16",
)
AT_HWCAP, AT_HWCAP2 = 16, 26

# MIDR fields of the CPUs qemu-aarch64 7.2 emulates that edge boards use (implementer 0x41 = Arm).
QEMU_CPUS = {
    "neoverse-n1": {"variant": "0x4", "part": "0xd0c", "revision": "1"},
    "cortex-a76": {"variant": "0x4", "part": "0xd0b", "revision": "1"},  # Raspberry Pi 5
    "cortex-a72": {"variant": "0x0", "part": "0xd08", "revision": "3"},  # Raspberry Pi 4
    "cortex-a57": {"variant": "0x1", "part": "0xd07", "revision": "0"},  # Jetson Nano / TX2
    "cortex-a55": {"variant": "0x2", "part": "0xd05", "revision": "0"},  # Rockchip RK3566/RK3568
    "cortex-a53": {"variant": "0x0", "part": "0xd03", "revision": "4"},  # Raspberry Pi 3 / Zero 2
}


def hwcap_features(auxv: bytes | None = None) -> list[str]:
    """The CPU features the kernel (or qemu) tells this process, decoded from its aux vector.

    This is the ground truth on aarch64: /proc/cpuinfo's "Features" line is printed from the same bits.
    Under qemu-user, /proc/self/auxv is qemu's, and the bits are those of the emulated CPU (QEMU_CPU).
    """
    if auxv is None:
        auxv = Path("/proc/self/auxv").read_bytes()
    values: dict[int, int] = {}
    for i in range(0, len(auxv) - 15, 16):
        key, value = struct.unpack("<QQ", auxv[i : i + 16])
        if key == 0:
            break
        values[key] = value
    found = [n for bit, n in enumerate(HWCAP_NAMES) if values.get(AT_HWCAP, 0) >> bit & 1]
    found += [n for bit, n in enumerate(HWCAP2_NAMES) if values.get(AT_HWCAP2, 0) >> bit & 1]
    return found


def arm_cpuinfo(features: list[str], cpus: int, qemu_cpu: str = "neoverse-n1") -> str:
    """A /proc/cpuinfo as an arm64 Linux kernel prints it, one block per CPU."""
    midr = QEMU_CPUS.get(qemu_cpu, QEMU_CPUS["neoverse-n1"])
    block = (
        "processor\t: {n}\n"
        "BogoMIPS\t: 50.00\n"
        f"Features\t: {' '.join(features)}\n"
        "CPU implementer\t: 0x41\n"
        "CPU architecture: 8\n"
        f"CPU variant\t: {midr['variant']}\n"
        f"CPU part\t: {midr['part']}\n"
        f"CPU revision\t: {midr['revision']}\n"
    )
    return "\n".join(block.format(n=n) for n in range(max(cpus, 1))) + "\n"


def elf_machine(path: str | os.PathLike[str]) -> str:
    """The architecture an ELF file (program or shared library) was built for, from its header."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    return {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "i386", 0xF3: "riscv"}.get(machine, hex(machine))
