"""One thread budget for the device: the CPUs the process may really use (affinity, cgroup quota), not the host's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agent.config.profile import RuntimeConfig
from agent.device.hardware import CpuBudget, RuntimeInfo, cpu_budget, physical_cores, probe
from agent.device.providers import core_budget, run_threads, thread_count
from agent.device.sysroot import SysRoot

pytestmark = pytest.mark.arm64
FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CPU_WHEEL = RuntimeInfo("1.32.0", ("CPUExecutionProvider",))


def tree(root: Path, files: dict[str, str], online: str = "0-15") -> SysRoot:
    """A /proc and /sys tree with 16 online CPUs and these files."""
    for rel, text in {"sys/devices/system/cpu/online": online + "\n", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return SysRoot(root)


def test_without_limits_the_budget_is_every_online_cpu(tmp_path: Path) -> None:
    budget = cpu_budget(tree(tmp_path, {"proc/self/status": "Name:\tpython\nCpus_allowed_list:\t0-15\n"}))
    assert budget == CpuBudget(usable=16, affinity=16, quota=None, limited_by="online CPUs")


def test_an_affinity_mask_bounds_the_budget(tmp_path: Path) -> None:
    budget = cpu_budget(tree(tmp_path, {"proc/self/status": "Cpus_allowed_list:\t2-3,8\n"}))
    assert budget == CpuBudget(usable=3, affinity=3, quota=None, limited_by="affinity")


def test_a_cgroup_v2_quota_bounds_the_budget_rounded_down(tmp_path: Path) -> None:
    # A container given 2.5 CPUs on a 16-CPU host (docker --cpus 2.5): cgroupns shows its own cgroup as /.
    fs = tree(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cgroup.controllers": "cpu io memory\n"})
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("250000 100000\n")
    assert cpu_budget(fs) == CpuBudget(usable=2, affinity=None, quota=2.5, limited_by="cgroup quota")
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("50000 100000\n")
    assert cpu_budget(fs).usable == 1  # half a CPU still runs one thread
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    assert cpu_budget(fs) == CpuBudget(usable=16, affinity=None, quota=None, limited_by="online CPUs")


def test_the_tightest_quota_along_the_cgroup_path_wins(tmp_path: Path) -> None:
    fs = tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu\n",
            "sys/fs/cgroup/system.slice/cpu.max": "300000 100000\n",
            "sys/fs/cgroup/system.slice/edge-agent.service/cpu.max": "max 100000\n",
        },
    )
    assert cpu_budget(fs).quota == 3.0 and cpu_budget(fs).usable == 3


def test_a_cgroup_v1_cfs_quota_bounds_the_budget(tmp_path: Path) -> None:
    # Docker on a cgroup v1 host: /proc/self/cgroup names the host's path, the container sees its own at the root.
    fs = tree(
        tmp_path,
        {
            "proc/self/cgroup": "12:cpu,cpuacct:/docker/4f2a\n11:memory:/docker/4f2a\n0::/\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cpu_budget(fs) == CpuBudget(usable=1, affinity=None, quota=1.0, limited_by="cgroup quota")
    (tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_budget(fs).quota is None


def test_thread_counts_and_autotune_options_follow_the_budget_not_the_cores(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "x86-rtx3060", tmp_path / "x86", symlinks=True)
    (tmp_path / "x86/proc/self").mkdir(parents=True)
    (tmp_path / "x86/proc/self/status").write_text("Cpus_allowed_list:\t0-1\n")
    found = probe(tmp_path / "x86", runtime=CPU_WHEEL)
    assert found.cpu.physical_cores == 12 and found.budget is not None and found.budget.usable == 2
    assert core_budget(found) == thread_count(RuntimeConfig(), found) == 2
    assert thread_count(RuntimeConfig(threads=6), found) == 6  # the profile's number is the operator's call
    assert core_budget(probe(FIXTURES / "x86-rtx3060", runtime=CPU_WHEEL)) == 12


@pytest.mark.parametrize("board", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_a_start_counts_the_cores_the_probe_counts(board: str) -> None:
    """A start sizes its first session before it probes (`core_budget()`): the same cores as the probe's."""
    assert physical_cores(SysRoot(FIXTURES / board)) == probe(FIXTURES / board, runtime=CPU_WHEEL).cpu.physical_cores


def test_cores_come_from_cpuinfo_where_sysfs_has_no_topology_and_match_psutil_here(tmp_path: Path) -> None:
    ht = "".join(f"processor\t: {n}\nphysical id\t: 0\ncore id\t: {n // 2}\n\n" for n in range(16))
    assert physical_cores(tree(tmp_path, {"proc/cpuinfo": ht})) == 8  # 16 hyperthreads on 8 cores
    assert physical_cores() == psutil.cpu_count(logical=False)  # the library it replaced, on this machine


@pytest.mark.parametrize(
    ("threads", "at_once", "each"), [(2, 1, 2), (2, 4, 1), (4, 2, 2), (4, 3, 1), (4, 8, 1), (1, 4, 1), (12, 5, 2)]
)
def test_runs_at_once_share_the_threads_out(threads: int, at_once: int, each: int) -> None:
    """Inferences that run at once on the CPU provider each get a share, so that together they use the budget
    once; one run alone keeps all of it."""
    assert run_threads(threads, at_once) == each
    assert each * min(at_once, threads) <= threads


CHILD = """
import json, os, sys
import numpy as np
from pathlib import Path
from agent.config.profile import RuntimeConfig
from agent.device.providers import core_budget
from agent.inference.processing.lazy import cv2
from agent.inference.runtime import load_model
sys.path.insert(0, os.getcwd())
from tests.helpers.models import linear_model, save
path = save(linear_model(np.ones((3, 1))), Path(sys.argv[1]) / "m.onnx")
model = load_model(path, RuntimeConfig(), Path(sys.argv[1]))
cv2.resize  # the first use imports OpenCV and sets its pool
print(json.dumps({
    "budget": core_budget(),
    "intra_op": model.shared.opened.threads,
    "session_option": model.session.get_session_options().intra_op_num_threads,
    "lanes": model.shared.lanes,
    "opencv": cv2.getNumThreads(),
}))
"""


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_process_pinned_to_one_cpu_sizes_every_pool_for_one(tmp_path: Path) -> None:
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"budget": 1, "intra_op": 1, "session_option": 1, "lanes": 1, "opencv": 1}
