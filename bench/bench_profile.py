"""How long loading a device profile takes: 1, 20 and 100 pipelines, cold import and warm loads.

Goal (issue 2): a 20-pipeline profile loads well under a second. Prints a table, writes
bench/results/profile_load.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

PIPELINE = """\
  - name: cam-{i}
    model: text-detector
    channel: stable
    source: {{type: camera, device: /dev/video{i}, fps: 10}}
    preprocess: {{resize: [640, 480], color: rgb, scale: 0.00392156862745098,
                 mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
    postprocess: {{type: text-detection, threshold: 0.3}}
"""
HEAD = """\
device: {id: bench-01, group: bench, state_dir: /tmp/bench-state}
registry: {url: "https://models.example.com/", public_key: /etc/edge-agent/registry.pub}
mqtt: {url: "mqtts://broker.example.com:8883", tls: {ca: /etc/edge-agent/ca.pem}}
pipelines:
"""


def write_profile(folder: Path, count: int) -> Path:
    path = folder / f"profile-{count}.yaml"
    path.write_text(HEAD + "".join(PIPELINE.format(i=i) for i in range(count)))
    return path


def cold_start_ms(path: Path) -> float:
    """A fresh interpreter importing the package and loading once: what `edge-agent check` costs."""
    code = f"import time; t=time.perf_counter(); from agent.config.profile import load_profile; load_profile({str(path)!r}); print((time.perf_counter()-t)*1000)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    from agent.config.profile import load_profile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, 20, 100):
            path = write_profile(Path(tmp), count)
            load_profile(path)
            times = []
            for _ in range(30):
                t = time.perf_counter()
                load_profile(path)
                times.append((time.perf_counter() - t) * 1000)
            cold = statistics.median(cold_start_ms(path) for _ in range(3))
            rows.append(
                {
                    "pipelines": count,
                    "warm_p50_ms": round(statistics.median(times), 2),
                    "warm_max_ms": round(max(times), 2),
                    "cold_import_and_load_ms": round(cold, 1),
                }
            )
            print(f"  measured {count} pipeline(s)", file=sys.stderr)
    print(f"{'pipelines':>9} {'warm p50 ms':>12} {'warm max ms':>12} {'cold ms':>9}")
    for r in rows:
        print(f"{r['pipelines']:>9} {r['warm_p50_ms']:>12} {r['warm_max_ms']:>12} {r['cold_import_and_load_ms']:>9}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "profile_load.json"
    out.write_text(json.dumps({"goal": "20 pipelines well under 1000 ms", "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
