"""The two versions the demo publishes: the real PP-OCR detector, then a republished copy of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.cloud.demo.printer import Printer
from agent.cloud.demo.profile import SAMPLE, SECOND
from agent.cloud.samples import cache_dir, sample_model


@dataclass(frozen=True)
class ModelFile:
    path: Path
    kind: str  # what the registry line says about it


def first_model(p: Printer) -> Path:
    """The sample detector from the cache, fetched (and said so) on the first run."""
    cached = (cache_dir() / "models" / f"{SAMPLE}.onnx").exists()
    if not cached:
        p.note(
            f"first run: fetching the PP-OCR text detector (rapidocr wheel, ~15 MB, sha256-pinned) into {cache_dir()}"
        )
    path = sample_model(SAMPLE, quiet=False)
    if not cached:
        p.note(f"cached {path} (kept for the next runs; delete {cache_dir()} to remove it)")
    return path


def derive_second(model: Path, workdir: Path, p: Printer) -> ModelFile:
    """The file version 1.1.0 publishes: the same PP-OCR weights with a release note in the model's
    metadata (so a new digest, a real download and a real swap), written with onnx (the cloud extra);
    the very same file when onnx is missing. (The int8 variant `--derive int8` makes is about three times
    slower on x86 CPUs: the agent's probation would roll it back, which is a demo of its own.)"""
    workdir.mkdir(exist_ok=True)
    try:
        import onnx

        proto = onnx.load(str(model))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "release", f"{SECOND}: same PP-OCRv4 weights, republished by edge-agent demo"
        target = workdir / f"{SAMPLE}-{SECOND}.onnx"
        onnx.save(proto, str(target))
        return ModelFile(target, "fp32, new metadata")
    except Exception as exc:  # noqa: BLE001 (ImportError without the cloud extra: the same file)
        p.note(f"onnx not usable ({exc.__class__.__name__}); {SECOND} republishes the same file")
        return ModelFile(model, "fp32, same file")
