"""Autotune: synthesised inputs, interleaved measurement with verification, and the cache key."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import pytest

from agent.config.profile import RuntimeConfig
from agent.device import autotune
from agent.device.autotune import Trial, judge_batching, measure, model_digest, synth_inputs, thread_options, tune
from agent.device.hardware import RuntimeInfo, probe
from agent.device.providers import CPU, CUDA, Candidate
from agent.device.session import open_session
from agent.transport.events import Event
from tests.helpers.models import linear_model, unary_model

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CPU_CANDIDATE = Candidate(CPU, {}, True, "test")
T = TypeVar("T")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "linear.onnx"
    path.write_bytes(linear_model(np.ones((8, 4), np.float32)).SerializeToString())
    return path


@pytest.mark.arm64
def test_inputs_are_synthesised_from_the_signature() -> None:
    session = ort.InferenceSession(unary_model(shape=("N", 3, "H", "W")).SerializeToString(), providers=[CPU])
    inputs = synth_inputs(session)
    assert inputs["x"].shape == (1, 3, 224, 224) and inputs["x"].dtype == np.float32
    assert synth_inputs(session, dims={"H": 480, "W": 640})["x"].shape == (1, 3, 480, 640)
    ints = ort.InferenceSession(unary_model("Identity", shape=(2,), elem=7).SerializeToString(), providers=[CPU])
    assert synth_inputs(ints)["x"].dtype == np.int64


@pytest.mark.arm64
def test_trial_statistics() -> None:
    t = Trial("CPUExecutionProvider", CPU, 2, CPU, tuple(float(x) for x in range(1, 21)))
    assert t.ok and t.p50_ms == 10.5 and t.p95_ms == 19.0 and t.throughput == pytest.approx(1000 / 10.5)
    failed = Trial("X", "X", 1, None, (), "session creation failed: boom")
    assert not failed.ok and failed.summary()["p50_ms"] is None


@pytest.mark.arm64
def test_thread_options_are_one_half_and_all_physical_cores() -> None:
    cpu_wheel = RuntimeInfo("1.32.0", (CPU,))
    assert thread_options(probe(FIXTURES / "jetson-agx-orin", runtime=cpu_wheel)) == [1, 6, 12]
    assert thread_options(probe(FIXTURES / "rpi4", runtime=cpu_wheel)) == [1, 2, 4]


@pytest.mark.arm64
def test_measure_times_each_config_in_turns_and_keeps_failures_with_their_reason(model: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int, str]] = []
    missing = Candidate(CUDA, {}, True, "test")
    trials = measure(
        model,
        [(CPU_CANDIDATE, 1), (CPU_CANDIDATE, 2), (missing, 1)],
        tmp_path,
        runs=5,
        warmup=1,
        progress=lambda d, t, w: progress.append((d, t, w)),
    )
    assert [(t.label, t.threads, t.verified, len(t.latencies_ms)) for t in trials[:2]] == [
        (CPU, 1, CPU, 5),
        (CPU, 2, CPU, 5),
    ]
    if CUDA not in ort.get_available_providers():
        assert (
            not trials[2].ok
            and trials[2].error is not None
            and trials[2].error.startswith("the session came up without it")
        )
    assert progress[-1] == (18, 18, "done") and all(d <= t for d, t, _ in progress)


@pytest.mark.arm64
def test_tune_caches_its_choice_keyed_by_model_hardware_and_runtime(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hw = probe("/")
    events: list[Event] = []
    first = tune(model, [CPU_CANDIDATE], tmp_path, hw, threads_options=[1, 2], emit=events.append, runs=3, warmup=1)
    assert first is not None and not first.cached and first.label == CPU and first.threads in (1, 2)
    assert [e.type for e in events] == ["provider.autotuned"] and len(events[0].fields["trials"]) == 2
    (path,) = (tmp_path / "autotune").iterdir()
    assert path.name == f"{model_digest(model)[:32]}-{hw.fingerprint()}-ort{ort.__version__}.json"
    saved = json.loads(path.read_text())
    assert (saved["label"], saved["threads"], saved["onnxruntime"]) == (first.label, first.threads, ort.__version__)

    def no_measuring(*args: object, **kwargs: object) -> list[Trial]:
        raise AssertionError("the cached choice should have been used")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    again = tune(model, [CPU_CANDIDATE], tmp_path, hw, threads_options=[1, 2], emit=events.append)
    assert again is not None and again.cached and (again.label, again.threads) == (first.label, first.threads)
    # Other silicon or another runtime build is another key: measured afresh.
    monkeypatch.undo()
    other = replace(hw, runtime=replace(hw.runtime, version="9.9.9"))
    assert tune(model, [CPU_CANDIDATE], tmp_path, other, threads_options=[1], runs=2, warmup=0) is not None
    assert len(list((tmp_path / "autotune").iterdir())) == 2


def in_time(work: Callable[[], T]) -> T:
    """`work()`'s result; fails where it is still waiting after 20 s (a FIFO read as a file waits for good)."""
    done: list[T] = []
    thread = threading.Thread(target=lambda: done.append(work()), daemon=True)
    thread.start()
    thread.join(20)
    assert done, "still waiting: a FIFO in a cache file's place held it up"
    return done[0]


def damage(path: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "garbage":
        path.write_text("{not json")
    else:
        os.mkfifo(path)


@pytest.mark.arm64
@pytest.mark.parametrize("how", ["garbage", "fifo"])
def test_a_corrupt_cache_file_is_measured_again(model: Path, tmp_path: Path, how: str) -> None:
    hw = probe("/")
    path = autotune.cache_path(tmp_path, model_digest(model), hw)
    damage(path, how)
    choice = in_time(lambda: tune(model, [CPU_CANDIDATE], tmp_path, hw, threads_options=[1], runs=2, warmup=0))
    assert choice is not None and not choice.cached and json.loads(path.read_text())["label"] == CPU


@pytest.mark.arm64
@pytest.mark.parametrize("how", ["garbage", "fifo"])
def test_a_corrupt_batching_verdict_is_measured_again(model: Path, tmp_path: Path, how: str) -> None:
    path = tmp_path / "autotune" / "batch.json"
    damage(path, how)
    session = ort.InferenceSession(str(model), providers=[CPU])
    name = session.get_inputs()[0].name
    verdict = in_time(lambda: judge_batching(session, name, np.ones((1, 8), np.float32), 2, path))
    assert not verdict.cached and json.loads(path.read_text())["size"] == 2


@pytest.mark.arm64
def test_open_session_with_autotune_uses_the_measured_choice(model: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    opened = open_session(model, RuntimeConfig(autotune=True), tmp_path, events.append)
    assert opened.autotuned and opened.provider == CPU
    (tuned,) = [e for e in events if e.type == "provider.autotuned"]
    assert opened.threads == tuned.fields["threads"] == opened.session.get_session_options().intra_op_num_threads
    assert any(n.startswith("autotune chose CPUExecutionProvider") for n in opened.notes)
    cached = open_session(model, RuntimeConfig(autotune=True), tmp_path, events.append)
    assert cached.threads == opened.threads and any("(cached:" in n for n in cached.notes)


@pytest.mark.arm64
def test_gpu_providers_are_timed_at_one_thread_count_only(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def fake_measure(
        model: object, configs: list[tuple[Candidate, int]], *args: object, **kwargs: object
    ) -> list[Trial]:
        seen.extend((c.label, t) for c, t in configs)
        return [Trial(c.label, c.provider, t, c.provider, (float(t),)) for c, t in configs]

    monkeypatch.setattr(autotune, "measure", fake_measure)
    chain = [
        Candidate("TensorrtExecutionProvider", {}, True, ""),
        Candidate("OpenVINOExecutionProvider", {"device_type": "GPU"}, True, ""),
        Candidate("OpenVINOExecutionProvider", {"device_type": "CPU"}, True, ""),
        CPU_CANDIDATE,
    ]
    choice = tune(model, chain, tmp_path, probe("/"), threads_options=[1, 4])
    assert seen == [
        ("TensorrtExecutionProvider", 4),
        ("OpenVINOExecutionProvider[GPU]", 4),
        ("OpenVINOExecutionProvider[CPU]", 1),
        ("OpenVINOExecutionProvider[CPU]", 4),
        (CPU, 1),
        (CPU, 4),
    ]
    assert choice is not None and (choice.label, choice.threads) == ("OpenVINOExecutionProvider[CPU]", 1)
