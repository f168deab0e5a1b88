"""Registry numbers: reading a model's header by hand vs onnx.load, proving the runtime's limits, and a
full pull (verify + test vectors + activate) of the real sample models over loopback.

Prints a table, writes bench/results/registry.json. Loopback hides the network: the pull figure is
the device's own cost (hashing, header check, session for the test vectors, fsyncs).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cloud.samples import sample_model
from agent.device import compat
from agent.models.store import Store
from tests.helpers.registry import make_registry

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], n: int = 5) -> float:
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(runs), 2)


def main() -> None:
    rows = []
    try:
        import onnx
    except ImportError:
        onnx = None
    for name in ("ppocr-det", "silero-vad-op15", "silero-vad", "silero-vad-op18"):
        path = sample_model(name, quiet=True)
        row = {
            "model": name,
            "bytes": path.stat().st_size,
            "header_ms": timed(lambda path=path: compat.read_header(path), 20),
            "summary_ms": timed(lambda path=path: compat.summarize(path)),
        }
        if onnx is not None:
            row["onnx_load_ms"] = timed(lambda path=path: onnx.load(str(path), load_external_data=False))
        rows.append(row)

    compat.installed_caps.cache_clear()
    verify_ms = timed(lambda: (compat.installed_caps.cache_clear(), compat.installed_caps()), 3)

    pulls: list[float] = []
    polls: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = make_registry(Path(tmp))
        try:
            reg.publish("text-detector", "1.0.0", sample_model("ppocr-det", quiet=True))
            for i in range(3):
                state = Path(tmp) / f"state{i}"
                client = reg.client(state, caps=compat.installed_caps())
                t0 = time.perf_counter()
                result = client.check_and_pull("text-detector")
                pulls.append((time.perf_counter() - t0) * 1000)
                assert result.status == "activated", result
                t0 = time.perf_counter()
                assert client.check_and_pull("text-detector").status == "current"
                polls.append((time.perf_counter() - t0) * 1000)
                assert Store(state).active("text-detector") is not None
        finally:
            reg.server.stop()

    out = {
        "header": rows,
        "verify_caps_ms": verify_ms,
        "pull_ppocr_det_loopback_ms": {
            "median": round(statistics.median(pulls), 1),
            "runs": [round(p, 1) for p in pulls],
        },
        "poll_unchanged_channel_ms": round(statistics.median(polls), 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "registry.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'model':<18}{'bytes':>10}{'header ms':>11}{'summary ms':>12}{'onnx.load ms':>14}")
    for r in rows:
        print(
            f"{r['model']:<18}{r['bytes']:>10}{r['header_ms']:>11}{r['summary_ms']:>12}{r.get('onnx_load_ms', '-'):>14}"
        )
    print(f"runtime limits proven by probe models: {verify_ms} ms")
    print(
        f"pull of ppocr-det (4.7 MB) over loopback, verify + test vectors + activate: median {out['pull_ppocr_det_loopback_ms']['median']} ms"
    )
    print(f"poll of an unchanged channel (conditional GETs): {out['poll_unchanged_channel_ms']} ms")


if __name__ == "__main__":
    main()
