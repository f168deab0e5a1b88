"""glibc's malloc set-up (agent.util.malloc): on the way to a start's first result, so it starts no child process."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's")

CHILD = """
import subprocess
def no_child(*args, **kwargs):
    raise AssertionError(f"a child process: {args}")
subprocess.Popen.__init__ = no_child
from agent.util.malloc import _libc_function, return_large_blocks
print(return_large_blocks(), _libc_function("malloc_trim") is not None, _libc_function("no_such_function"))
"""


def test_large_blocks_go_back_to_the_kernel_without_a_child_process_finding_the_c_library() -> None:
    # ctypes.util.find_library("c") ran `ldconfig -p` (3 ms and a fork) at every start and every trim
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "None"]
