"""Real models end to end through pipelines (no mocks): PP-OCR text detection on text the test draws,
Silero VAD with its state carried on known silence and speech, a scikit-learn classifier on a csv
stream. Not marked arm64: too slow under emulation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.config.base import adapter
from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.inference.loader import open_pipeline
from tests.helpers import media
from tests.test_pipeline import Recorder

RUNTIME = RuntimeConfig(threads=2)
# PP-OCR needs sides that are multiples of 32; 320x256 keeps the tests quick on a shared CPU.
OCR_PRE = {
    "resize": [320, 256],
    "color": "rgb",
    "scale": 0.00392156862745098,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "layout": "nchw",
    "dtype": "float32",
}


def run_to_end(tmp_path: Path, sink: Recorder, **fields: Any) -> Any:
    cfg = adapter(PipelineConfig).validate_python({"name": "p", **fields})
    pipe = open_pipeline(cfg, sink, device="dev", runtime=RUNTIME, state_dir=tmp_path, emit=sink.event).start()
    assert pipe.wait(120), "the pipeline did not finish"
    pipe.stop()
    return pipe


def assert_boxes_match(found: list[dict[str, Any]], truth: list[list[int]]) -> None:
    assert len(found) == len(truth), f"{found} vs {truth}"
    for box in truth:
        best = max(media.iou(f["box"], box) for f in found)
        assert best > 0.5, f"no detection over {box}: {found}"


@pytest.fixture(scope="module")
def ocr_frames() -> list[tuple[str, np.ndarray, list[list[int]]]]:
    plain, plain_boxes = media.text_frame(320, 240, "plain")
    noisy, noisy_boxes = media.text_frame(
        320, 240, "noisy", lines=[("GATE 7", (150, 90)), ("PARCEL 2031", (15, 200))], seed=3
    )
    big, big_boxes = media.text_frame(
        640, 480, "plain", lines=[("NORTH DOCK", (60, 120)), ("BAY 12", (330, 400))], scale=1.6, thickness=3
    )
    return [
        ("a-plain.png", plain, plain_boxes),
        ("b-noisy.png", noisy, noisy_boxes),
        ("c-empty.png", media.background(320, 240, "noisy", seed=9), []),
        ("d-big.png", big, big_boxes),
        ("e-empty-plain.png", media.background(320, 240), []),
    ]


def test_ppocr_finds_each_drawn_text_line_and_nothing_on_empty_frames(
    tmp_path: Path, sample_model: Callable[[str], Path], ocr_frames: list
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, img, _ in ocr_frames:
        cv2.imwrite(str(folder / name), img)
    (folder / "notes.txt").write_text("an operator's note, not an image")
    sink = Recorder()
    pipe = run_to_end(
        tmp_path,
        sink,
        model=str(sample_model("ppocr-det")),
        source={"type": "images", "path": str(folder)},
        preprocess=OCR_PRE,
        postprocess={"type": "text-detection", "threshold": 0.3},
    )
    assert len(sink.results) == len(ocr_frames)
    for result, (_, _, truth) in zip(sink.results, ocr_frames, strict=True):
        assert_boxes_match(result["output"]["boxes"], truth)
    assert [e.fields["reason"] for e in sink.events if e.type == "frame.rejected"] == [
        "notes.txt is not an image OpenCV can read"
    ]
    assert pipe.stats()["rejected"] == 1


def test_ppocr_through_an_mp4_written_and_read_back_by_opencv(
    tmp_path: Path, sample_model: Callable[[str], Path], ocr_frames: list
) -> None:
    clips = [(img, truth) for _, img, truth in ocr_frames if img.shape == (240, 320, 3)]
    video = media.write_mp4(tmp_path / "clip.mp4", [img for img, _ in clips], fps=5)
    sink = Recorder()
    run_to_end(
        tmp_path,
        sink,
        model=str(sample_model("ppocr-det")),
        source={"type": "video", "path": str(video)},
        preprocess=OCR_PRE,
        postprocess={"type": "text-detection"},
    )
    assert [r["t"] for r in sink.results] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    for result, (_, truth) in zip(sink.results, clips, strict=True):
        assert_boxes_match(result["output"]["boxes"], truth)


@pytest.mark.skipif(
    not media.espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng) to synthesise speech"
)
def test_silero_vad_with_state_opens_and_closes_on_speech_and_stays_quiet_in_silence_and_noise(
    tmp_path: Path, sample_model: Callable[[str], Path]
) -> None:
    rate = 16000
    parts = [
        ("silence", media.silence(1.0)),
        ("speech", media.speech("Hello there, this is a test of the voice detector.", tmp_path)),
        ("silence", media.silence(1.5)),
        ("noise", media.noise(2.0, level=0.01)),
        ("silence", media.silence(0.7)),
        ("speech", media.speech("Open the north gate please.", tmp_path)),
        ("silence", media.silence(1.2)),
    ]
    spans, pos = [], 0
    for kind, samples in parts:
        if kind == "speech":
            spans.append((pos / rate, (pos + len(samples)) / rate))
        pos += len(samples)
    wav = media.write_wav(tmp_path / "door.wav", np.concatenate([s for _, s in parts]))
    sink = Recorder()
    run_to_end(
        tmp_path,
        sink,
        model=str(sample_model("silero-vad")),
        source={"type": "audio", "path": str(wav), "sample_rate": 16000, "window": 512, "context": 64},
        inputs={"sr": 16000},
        state={"state": "stateN"},
        postprocess={"type": "threshold", "output": "output", "threshold": 0.5},
    )
    events = [(r["output"]["event"], r["output"]["t"]) for r in sink.results]
    assert [e for e, _ in events] == ["open", "close"] * len(spans), events
    for (start, end), ((_, opened), (_, closed)) in zip(
        spans, zip(events[::2], events[1::2], strict=True), strict=True
    ):
        assert start - 0.05 <= opened <= start + 0.150, (start, opened)
        assert end - 0.05 <= closed <= end + 0.500, (end, closed)


def test_a_scikit_learn_classifier_on_a_csv_stream_publishes_its_maps_as_json(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.3, (40, 3)), rng.normal(3, 0.3, (40, 3))]).astype(np.float32)
    y = np.array([0] * 40 + [1] * 40)
    clf = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    model = tmp_path / "vibration.onnx"
    model.write_bytes(to_onnx(clf, x[:1], target_opset={"": 15, "ai.onnx.ml": 3}).SerializeToString())
    csv = tmp_path / "vib.csv"
    rows = [(0.1, -0.2, 0.0), (3.1, 2.9, 3.0), ("n/a", 1, 1), (0.0, 0.1, 0.2)]
    csv.write_text(
        "time,ax,ay,az\n" + "".join(f"2026-11-25T10:00:0{i}Z,{a},{b},{c}\n" for i, (a, b, c) in enumerate(rows))
    )
    for post, check in (
        (
            {"type": "raw"},
            lambda out: (
                out["output_label"][0],
                max(out["output_probability"][0], key=out["output_probability"][0].get),
            ),
        ),
        (
            {"type": "classification", "top_k": 1},
            lambda out: (out["classes"][0]["class"], str(out["classes"][0]["class"])),
        ),
    ):
        sink = Recorder()
        run_to_end(
            tmp_path,
            sink,
            model=str(model),
            postprocess=post,
            source={"type": "csv", "path": str(csv), "columns": ["ax", "ay", "az"], "timestamp": "time"},
        )
        doc = json.loads(json.dumps([r["output"] for r in sink.results]))  # plain JSON, nothing numpy left
        assert [check(out) for out in doc] == [(0, "0"), (1, "1"), (0, "0")]
        assert [r["t"] for r in sink.results] == [0.0, 1.0, 3.0] and [r["ts"] for r in sink.results][
            0
        ] == "2026-11-25T10:00:00.000Z"
        assert any("'n/a' in column 'ax'" in e.fields.get("reason", "") for e in sink.events)
