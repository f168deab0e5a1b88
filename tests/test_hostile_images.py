"""Hostile files in an images folder (one others may write to): a decompression bomb, a file too large to
be an image, names that come and go. Each is refused with a `frame.rejected` event naming the file; the
agent's memory stays bounded and the good images around them come through.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import pytest

from agent.inference.sources import SOURCES, make_source
from agent.inference.sources.base import SourceContext
from agent.inference.sources.images import MAX_IMAGE_BYTES
from agent.transport.events import Event
from agent.util.libraries import MAX_SIDE
from tests.helpers import media
from tests.helpers.models import save, unary_model
from tests.helpers.profiles import one_pipeline

REPO = Path(__file__).resolve().parent.parent
# Runs a command and prints the peak RSS (KiB) of its process tree's largest member on stderr's last line.
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros: about 140 KB for 12000x12000, 430 MB once decoded to BGR."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # a filter byte, then the row
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_bomb_and_an_oversized_file_are_refused_by_a_running_agent_in_bounded_memory(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    img, _ = media.text_frame(64, 48)
    cv2.imwrite(str(folder / "a.png"), img)
    side = MAX_SIDE + 3808  # 12000: over the bound, under OpenCV's own default of 2^30 pixels
    (folder / "b-bomb.png").write_bytes(png_bomb(side, side))
    with (folder / "c-huge.png").open("wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: no disk used
    cv2.imwrite(str(folder / "d.png"), img)
    model = save(unary_model("Relu", shape=("N", 3, 24, 32)), tmp_path / "m.onnx")
    profile = one_pipeline(
        tmp_path,
        model,
        {"type": "images", "path": str(folder), "pattern": "*.png"},
        preprocess={"resize": [32, 24], "scale": 0.004},
    )
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "agent", "run", "--profile", str(profile)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    log, peak_kib = done.stderr.rsplit("\n", 2)[0], int(done.stderr.split()[-1])
    assert done.returncode == 0, log[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["source_seq"] for r in results] == [0, 1], log[-3000:]
    assert f"reason='b-bomb.png has more pixels than the {MAX_SIDE}x{MAX_SIDE} an image may have" in log
    assert "reason='c-huge.png is larger than 128 MiB" in log
    assert "Traceback" not in log and "source.error" not in log
    # Decoding the bomb took 900 MB before OpenCV was told the bound; the agent itself takes about 150.
    assert peak_kib < 350 * 1024, f"peak RSS {peak_kib >> 10} MiB"


@pytest.mark.arm64
def test_a_watched_folder_forgets_names_whose_files_are_gone(tmp_path: Path) -> None:
    """A folder emptied as it is read (the usual drop folder) keeps no names: a file that comes back
    under a name read before is a new file and is read again."""
    img, _ = media.text_frame(64, 48)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    config = SOURCES["images"].Config(type="images", path=tmp_path, watch=True)
    events: list[Event] = []
    src = make_source(config, SourceContext("p", events.append))
    stop = threading.Event()
    seen: list[str] = []

    def drop_and_return() -> None:
        time.sleep(0.3)
        (tmp_path / "a.png").unlink()
        time.sleep(1.2)  # two polls: the scan without it, then it is back
        cv2.imwrite(str(tmp_path / "a.png"), img)

    threading.Thread(target=drop_and_return, daemon=True).start()
    give_up = threading.Timer(8, stop.set)  # the source waits on `stop` between polls: it ends then
    give_up.start()
    try:
        for frame in src.frames(stop):
            seen.append(frame.meta["file"])
            if len(seen) == 2:
                stop.set()
    finally:
        give_up.cancel()
    assert seen == ["a.png", "a.png"] and not events
