"""CPU provider against OpenVINO on the PP-OCR text detector at 640x480: warm, interleaved, side by side.

    .venv/bin/python bench/bench_providers.py [--runs 60] [--threads N]

onnxruntime-openvino replaces the onnxruntime module, so when the running interpreter lacks OpenVINO this
script builds (once) the separate venv of scripts/openvino-venv.sh and runs itself there. Prints a table
and the ratio; writes bench/results/providers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def reexec_in_openvino_venv() -> int:
    print("bench: this onnxruntime has no OpenVINO; using scripts/openvino-venv.sh", file=sys.stderr)
    python = subprocess.run(
        [str(REPO / "scripts" / "openvino-venv.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGE_AGENT_BENCH_CHILD": "1"}
    return subprocess.run([python, __file__, *sys.argv[1:]], env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="timed runs per provider (default 60)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: physical cores)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "providers.json"))
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        if os.environ.get("EDGE_AGENT_BENCH_CHILD"):
            raise SystemExit("bench: the OpenVINO venv has no OpenVINOExecutionProvider")
        return reexec_in_openvino_venv()

    from agent.cloud.samples import sample_model
    from agent.device import hardware
    from agent.device.autotune import measure
    from agent.device.providers import CPU, OPENVINO, Candidate
    from agent.util.progress import ProgressBar

    model = sample_model("ppocr-det", quiet=True)
    found = hardware.probe("/")
    threads = args.threads or found.cpu.physical_cores
    candidates = [Candidate(OPENVINO, {"device_type": "CPU"}, True, "bench"), Candidate(CPU, {}, True, "bench")]
    # A 640x480 camera frame, normalised as the detector expects (values do not change its cost).
    frame = np.random.default_rng(0).standard_normal((1, 3, 480, 640)).astype(np.float32)
    state_dir = REPO / "bench" / "results" / "state"
    started = time.monotonic()
    trials = measure(
        model,
        [(c, threads) for c in candidates],
        state_dir,
        {"x": frame},
        runs=args.runs,
        warmup=args.warmup,
        progress=ProgressBar("bench"),
    )
    print(
        f"PP-OCRv4 detector, 1x3x480x640, {threads} threads, {args.runs} runs each, warm, in turns "
        f"(onnxruntime {ort.__version__} + OpenVINO, {found.cpu.model}, {found.cpu.physical_cores} cores)"
    )
    print(f"{'provider':<32} {'verified on':<28} {'p50 ms':>8} {'p95 ms':>8} {'inf/s':>7}")
    for t in trials:
        if t.ok:
            print(f"{t.label:<32} {t.verified or '?':<28} {t.p50_ms:>8.2f} {t.p95_ms:>8.2f} {t.throughput:>7.1f}")
        else:
            print(f"{t.label:<32} not usable: {t.error}")
    ov, cpu = trials
    result = {
        "model": "ppocr-det",
        "input": [1, 3, 480, 640],
        "threads": threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "onnxruntime": ort.__version__,
        "cpu": found.cpu.model,
        "physical_cores": found.cpu.physical_cores,
        "seconds": round(time.monotonic() - started, 1),
        "trials": [t.summary() for t in trials],
    }
    if ov.ok and cpu.ok:
        ratio = cpu.p50_ms / ov.p50_ms
        result["openvino_speedup_p50"] = round(ratio, 3)
        print(f"OpenVINO / CPU: {ratio:.2f}x (p50 {ov.p50_ms:.1f} ms against {cpu.p50_ms:.1f} ms)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ov.ok and cpu.ok else 1


if __name__ == "__main__":
    sys.exit(main())
