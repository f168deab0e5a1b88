"""kill -9 of a real `edge-agent models pull` at 20 random moments always leaves a consistent store.

The registry throttles blobs so that a pull takes about half a second of download: kills land before,
during and after the download, in the test-vector run, the commit and the pointer switch. After every
kill the store must hold a complete, verified active version (or none yet), and the next pull must
finish the job, resuming partial downloads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.models.manifest import file_digest, parse_manifest
from agent.models.store import Store
from tests.helpers.registry import make_registry

REPO = Path(__file__).resolve().parent.parent
VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]


def pull_cmd(url: str, public: Path, state: Path, version: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent",
        "models",
        "pull",
        "m",
        "--version",
        version,
        "--allow-older",
        "--registry",
        url,
        "--public-key",
        str(public),
        "--state-dir",
        str(state),
        "--keep",
        "2",
        "--quiet",
        "--timeout",
        "10",
    ]


def assert_consistent(state: Path, published: dict[str, str]) -> str | None:
    store = Store(state, keep_versions=2)
    assert store.check("m", deep=True) == []
    active = store.active("m")
    # Every folder with a real name is a complete, verified version; anything else is hidden (dot) and temporary.
    for folder in (state / "models" / "m").iterdir() if (state / "models" / "m").exists() else []:
        if folder.name.startswith(".") or folder.name == "pointer.json":
            continue
        entry = store.installed("m", folder.name)
        assert file_digest(entry.path) == entry.digest == published[folder.name]
        assert parse_manifest((folder / "manifest.json").read_bytes()).version == folder.name
    return active.version if active else None


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_consistent_store(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, throttle_bps=2_000_000)
    try:
        published = {}
        for i, version in enumerate(VERSIONS):
            result = registry.publish("m", version, registry.tiny(f"m{i}", doc=os.urandom(1_000_000)), channel=None)
            published[version] = result.manifest.variants[0].blob.digest
        state = tmp_path / "state"
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        t0 = time.monotonic()
        first = subprocess.run(
            pull_cmd(registry.url, registry.public_key, state, VERSIONS[0]),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        duration = time.monotonic() - t0
        assert first.returncode == 0, first.stderr
        assert assert_consistent(state, published) == VERSIONS[0]

        rng = random.Random(20261125)
        for i in range(20):
            version = VERSIONS[(i + 1) % len(VERSIONS)]
            proc = subprocess.Popen(
                pull_cmd(registry.url, registry.public_key, state, version),
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # The first third of a pull is interpreter start-up; kills are spread over the rest and past the end.
            time.sleep(rng.uniform(duration * 0.3, duration * 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert assert_consistent(state, published) in published

        # One kill surely mid-download, then the next pull must resume it with a Range request.
        on_disk = set(Store(state).versions("m"))
        version = next(v for v in VERSIONS if v not in on_disk)
        part = state / "models" / ".partial" / published[version].split(":")[1]
        part.unlink(missing_ok=True)
        proc = subprocess.Popen(
            pull_cmd(registry.url, registry.public_key, state, version),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 250_000) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kept = part.stat().st_size
        assert 0 < kept < 1_000_000
        assert_consistent(state, published)

        final = subprocess.run(
            pull_cmd(registry.url, registry.public_key, state, version),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert final.returncode == 0, final.stderr
        assert assert_consistent(state, published) == version
        assert [r["range"] for r in registry.blob_requests() if r["path"].endswith(part.name)][-1] == f"bytes={kept}-"
        leftovers = [p.name for p in (state / "models" / "m").iterdir() if p.name.startswith(".")]
        assert leftovers == [] and len(Store(state).versions("m")) <= 3
    finally:
        registry.server.stop()
