"""Test media made on the spot: frames with text at known places, MP4 files, WAV audio with speech.

Ground truth is the ink: each line is drawn alone on a mask and its bounding box taken, so a test
compares detections with where the text really is.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
Box = list[int]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def background(width: int, height: int, kind: str = "plain", seed: int = 0) -> np.ndarray:
    """A light BGR background: plain grey-white, or with Gaussian noise."""
    img = np.full((height, width, 3), 225, dtype=np.uint8)
    if kind == "noisy":
        rng = np.random.default_rng(seed)
        img = np.clip(img.astype(np.int16) + rng.normal(0, 18, img.shape), 0, 255).astype(np.uint8)
    return img


def draw_text(
    img: np.ndarray, lines: Sequence[tuple[str, tuple[int, int]]], scale: float = 1.2, thickness: int = 3
) -> list[Box]:
    """Draw dark text at each origin (bottom-left of the baseline); return each line's ink box."""
    boxes = []
    for text, origin in lines:
        mask = np.zeros(img.shape[:2], dtype=np.uint8)
        cv2.putText(mask, text, origin, FONT, scale, 255, thickness, cv2.LINE_AA)
        x, y, w, h = cv2.boundingRect(cv2.findNonZero(mask))
        boxes.append([x, y, x + w, y + h])
        cv2.putText(img, text, origin, FONT, scale, (25, 25, 25), thickness, cv2.LINE_AA)
    return boxes


def text_frame(
    width: int = 320,
    height: int = 240,
    kind: str = "plain",
    lines: Sequence[tuple[str, tuple[int, int]]] | None = None,
    scale: float = 1.0,
    thickness: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, list[Box]]:
    img = background(width, height, kind, seed)
    if lines is None:
        lines = [("EDGE AGENT", (20, 60)), ("HELLO 42", (40, 150))]
    return img, draw_text(img, lines, scale, thickness)


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """An MP4 (mp4v) written by OpenCV, as a camera recorder would leave it."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """Mono 16-bit PCM."""
    pcm = np.clip(samples * 32767.0, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        data = w.readframes(w.getnframes())
    assert width == 2
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    n = int(round(len(samples) * target / rate))
    return np.interp(np.linspace(0, len(samples) - 1, n), np.arange(len(samples)), samples).astype(np.float32)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speech(text: str, workdir: Path, rate: int = 16000) -> np.ndarray:
    """Speech synthesised by espeak-ng, resampled to `rate`, trimmed to where the voice really is."""
    out = workdir / f"speech-{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(out), text], check=True, capture_output=True)
    samples, native = read_wav(out)
    samples = resample(samples, native, rate)
    loud = np.nonzero(np.abs(samples) > 0.02)[0]
    return samples[loud[0] : loud[-1] + 1]


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def noise(seconds: float, level: float = 0.02, rate: int = 16000, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, level, int(seconds * rate))).astype(np.float32)
