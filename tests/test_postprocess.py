"""Post-processors on hand-made outputs: each plug-in's decoding, mapping to source pixels, state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.inference.processing.post import POSTPROCESSORS, make_postprocessor
from agent.inference.processing.post.base import PostContext
from agent.inference.processing.pre import Geometry

pytestmark = pytest.mark.arm64


def make(kind: str, names: list[str] | None = None, types: dict[str, str] | None = None, **fields: object):
    config = POSTPROCESSORS[kind].Config(type=kind, **fields)
    return make_postprocessor(config, names or ["out"], types)


def test_every_registered_postprocessor_has_an_implementation() -> None:
    assert set(POSTPROCESSORS) == {"raw", "classification", "detection", "text-detection", "threshold", "anomaly"}
    assert all(hasattr(m, "Postprocessor") for m in POSTPROCESSORS.values())


def test_raw_publishes_tensors_as_lists_and_maps_as_objects() -> None:
    post = make("raw", ["label", "probabilities"], round=3)
    out = post(
        {"label": np.array([2], dtype=np.int64), "probabilities": [{0: np.float32(0.1234567), 2: 0.8766}]},
        PostContext(),
    )
    assert out == {"label": [2], "probabilities": [{"0": 0.123, "2": 0.877}]}
    with pytest.raises(ValueError, match="no output 'nope'"):
        make("raw", ["a"], outputs=["nope"])


def test_a_labels_file_that_is_not_a_small_text_file_is_refused_at_once_naming_it(tmp_path: Path) -> None:
    """A FIFO blocked the pipeline's start for ever, /dev/zero never ended, a huge file was read whole."""
    import os
    import threading

    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"label\n" * 200_000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = {
        fifo: "a FIFO, not a regular file",
        Path("/dev/zero"): "a device, not a regular file",
        tmp_path: "a directory, not a regular file",
        huge: "larger than 1048576 bytes",
        latin1: "can't decode byte 0xe9",
    }
    for path, words in cases.items():
        refused: list[str] = []
        reader = threading.Thread(target=lambda p=path, out=refused: out.append(_refusal(p)), daemon=True)
        reader.start()
        reader.join(5)
        assert refused and refused[0].startswith(f"labels file {path}: ") and words in refused[0], (path, refused)


def _refusal(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        make("classification", labels=path)
    return str(info.value)


def test_classification_softmax_top_k_labels(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    post = make("classification", softmax=True, top_k=2, labels=labels)
    out = post({"out": np.array([[1.0, 3.0, 2.0]])}, PostContext())
    assert [c["label"] for c in out["classes"]] == ["dog", "bird"]
    assert out["classes"][0]["score"] == pytest.approx(np.exp(3) / np.exp([1, 3, 2]).sum(), abs=1e-5)


def test_classification_reads_the_zipmap_of_a_scikit_learn_model() -> None:
    types = {"output_label": "tensor(int64)", "output_probability": "seq(map(int64,tensor(float)))"}
    post = make("classification", ["output_label", "output_probability"], types, top_k=2, threshold=0.2)
    out = post({"output_label": np.array([1]), "output_probability": [{0: 0.1, 1: 0.7, 2: 0.2}]}, PostContext())
    assert out == {"classes": [{"class": 1, "score": 0.7}, {"class": 2, "score": 0.2}]}


def yolo_v8(rows: list[tuple[float, float, float, float, int, float]], classes: int = 3) -> np.ndarray:
    out = np.zeros((1, 4 + classes, len(rows)), dtype=np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def test_detection_yolov8_filters_suppresses_and_maps_through_the_letterbox() -> None:
    post = make("detection", threshold=0.3, iou=0.5)
    raw = yolo_v8(
        [(100, 100, 40, 40, 0, 0.9), (102, 101, 40, 40, 0, 0.8), (102, 101, 40, 40, 1, 0.7), (300, 300, 20, 20, 2, 0.1)]
    )
    geo = Geometry(640, 480, scale_x=0.5, scale_y=0.5, pad_x=0, pad_y=40)  # 640x480 letterboxed into 320x320
    out = post({"out": raw}, PostContext(geometry=geo))["detections"]
    assert [(d["class"], d["score"]) for d in out] == [
        (0, 0.9),
        (1, 0.7),
    ]  # same-class overlap suppressed, low score dropped
    assert out[0]["box"] == [160, 80, 240, 160]


def test_detection_yolov5_multiplies_objectness_and_keeps_only_listed_classes() -> None:
    post = make("detection", format="yolov5", threshold=0.5, classes=[1])
    raw = np.array(
        [[[50, 50, 10, 10, 0.9, 0.1, 0.9], [80, 80, 10, 10, 0.5, 0.0, 0.9], [20, 20, 4, 4, 0.9, 0.9, 0.0]]],
        dtype=np.float32,
    )
    out = post({"out": raw}, PostContext())["detections"]
    assert [(d["class"], d["box"]) for d in out] == [(1, [45.0, 45.0, 55.0, 55.0])]


def test_text_detection_boxes_around_probability_blobs_and_none_on_an_empty_map() -> None:
    post = make("text-detection")
    prob = np.zeros((1, 1, 128, 256), dtype=np.float32)
    prob[0, 0, 20:40, 30:200] = 0.95
    prob[0, 0, 80:100, 60:120] = 0.9
    prob[0, 0, 5:6, 5:6] = 0.99  # a speck, too small to be text
    geo = Geometry(512, 256, scale_x=0.5, scale_y=0.5)
    boxes = post({"out": prob}, PostContext(geometry=geo))["boxes"]
    assert len(boxes) == 2
    (a, b) = (boxes[0]["box"], boxes[1]["box"])
    # Grown around the core (unclip), in source pixels (x2).
    assert a[0] < 60 and a[1] < 40 and a[2] > 398 and a[3] > 78 and a[2] < 440
    assert b[0] < 120 and b[1] < 160 and b[2] > 238 and b[3] > 198
    assert all(0.89 < x["score"] <= 1 for x in boxes)
    assert post({"out": np.zeros((1, 1, 64, 64), np.float32)}, PostContext())["boxes"] == []


def run_threshold(post: object, scores: list[float], step: float = 0.1) -> list[dict]:
    out = []
    for i, s in enumerate(scores):
        r = post({"out": np.array([[s]], dtype=np.float32)}, PostContext(t=i * step))  # type: ignore[operator]
        if r is not None:
            out.append(r)
    return out


def test_threshold_opens_and_closes_with_hysteresis_and_min_off() -> None:
    post = make("threshold", threshold=0.5, off_threshold=0.3, min_off=0.2)
    events = run_threshold(post, [0.1, 0.6, 0.45, 0.4, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.2])
    # 0.45 and 0.4 are between the thresholds: still open; the dip at 0.4 s is too short to close.
    assert [(e["event"], e["t"]) for e in events] == [("open", 0.1), ("close", 0.6)]
    assert events[1]["duration"] == pytest.approx(0.5) and events[1]["peak"] == pytest.approx(0.6)


def test_threshold_drops_events_shorter_than_min_on() -> None:
    post = make("threshold", threshold=0.5, min_on=0.3, min_off=0.0)
    assert run_threshold(post, [0.9, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1]) == [
        {"event": "open", "t": 0.3, "score": 0.9},
        {"event": "close", "t": 0.7, "duration": 0.4, "score": 0.1, "peak": 0.9},
    ]


def test_anomaly_score_and_reconstruction_error() -> None:
    post = make("anomaly", threshold=0.5, report="anomalies")
    assert post({"out": np.array([[0.2]])}, PostContext()) is None
    assert post({"out": np.array([[0.8]])}, PostContext()) == {"score": 0.8, "anomaly": True}
    recon = make("anomaly", method="reconstruction", threshold=0.1)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    assert recon({"out": x + 0.5}, PostContext(input=x)) == {"score": 0.25, "anomaly": True}
    with pytest.raises(ValueError, match="the size of the input"):
        recon({"out": np.zeros(3)}, PostContext(input=x))
