"""Shared sessions: one per model and settings, leased by pipelines; lanes; dynamic batching across pipelines."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config.base import adapter
from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.config.runtime import BatchingConfig
from agent.device.session import OpenedSession
from agent.inference.loader import open_pipeline
from agent.inference.pipeline import Pipeline
from agent.inference.runtime import load_model
from agent.inference.sessions import POOL, SessionKey, SharedSession
from tests.helpers.models import linear_model, save
from tests.test_pipeline import Recorder, pool_model, write_csv

pytestmark = pytest.mark.arm64
RUNTIME = RuntimeConfig(threads=1)


def pipeline(
    tmp_path: Path,
    sink: Recorder,
    name: str,
    model: Path,
    source: dict[str, Any],
    version: str | None = None,
    **more: Any,
) -> Pipeline:
    config = adapter(PipelineConfig).validate_python({"name": name, "model": str(model), "source": source, **more})
    return open_pipeline(
        config, sink, device="dev", runtime=RUNTIME, state_dir=tmp_path, emit=sink.event, model_version=version
    )


def test_pipelines_on_one_model_share_one_session_until_the_last_lets_go(tmp_path: Path) -> None:
    path = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    a = load_model(path, RUNTIME, tmp_path, name="a")
    b = load_model(path, RUNTIME, tmp_path, name="b")
    other_level = load_model(path, RUNTIME, tmp_path, name="c", optimization="basic")
    assert a.shared is b.shared and a.session is b.session
    assert other_level.shared is not a.shared  # a different optimisation level is a different session
    assert a.shared.users == 2 and a.shared in POOL.sessions()
    a.close()
    a.close()  # giving back twice is once
    assert b.shared.users == 1 and b.shared in POOL.sessions()
    np.testing.assert_allclose(b.run(np.ones((1, 3), np.float32))["y"], [[3.0]])
    assert b.shared.first is None  # no successor waits for it: no frame's input is held
    shared = b.shared
    b.close()
    other_level.close()
    assert shared not in POOL.sessions()


def test_a_model_dropped_without_close_gives_its_lease_back(tmp_path: Path) -> None:
    path = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    model = load_model(path, RUNTIME, tmp_path)
    shared = model.shared
    del model
    assert shared not in POOL.sessions()


def test_all_pipelines_of_a_model_swap_onto_one_new_session_and_the_old_one_is_freed(tmp_path: Path) -> None:
    v1 = save(pool_model(1.0), tmp_path / "v1.onnx")
    v2 = save(pool_model(2.0), tmp_path / "v2.onnx")
    sink = Recorder()
    # 5 s of frames: the swaps (three loads and warm-ups, slow under emulation) end while they still flow
    source = {"type": "synthetic", "width": 64, "height": 48, "fps": 40, "frames": 200}
    pipes = [
        pipeline(tmp_path, sink, f"cam{i}", v1, source, preprocess={"resize": [32, 24]}, version="1") for i in range(3)
    ]
    old = pipes[0].model.shared
    assert all(p.model.shared is old for p in pipes) and old.users == 3
    for p in pipes:
        p.start()
    time.sleep(0.3)
    for p in pipes:
        p.swap(v2, version="2")
    new = pipes[0].model.shared
    assert all(p.model.shared is new for p in pipes) and new.users == 3 and new is not old
    assert old not in POOL.sessions() and old.users == 0
    assert all(p.wait(30) for p in pipes)
    for p in pipes:
        p.stop()
        results = [r for r in sink.results if r["pipeline"] == p.name]
        assert [r["source_seq"] for r in results] == list(range(200))  # no frame lost in the swap
        versions = [r["model_version"] for r in results]
        assert [k for k, _ in itertools.groupby(versions)] == ["1", "2"]
    assert new not in POOL.sessions()


class FakeSession:
    """Stands for an InferenceSession: y = 2x, slow enough to overlap; records concurrency and batch sizes."""

    def __init__(self, delay: float = 0.05, fail_batches: bool = False) -> None:
        self.delay = delay
        self.fail_batches = fail_batches
        self.running = 0
        self.most_at_once = 0
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def run(self, names: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        x = next(iter(feeds.values()))
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append(len(x))
        try:
            time.sleep(self.delay)
            if self.fail_batches and len(x) > 1:
                raise RuntimeError("this model does not take a batch after all")
            return [x * 2]
        finally:
            with self.lock:
                self.running -= 1


def shared_session(
    fake: FakeSession, lanes: int, batching: BatchingConfig, stream_users: int = 0, users: int = 0
) -> SharedSession:
    """A session leased by `users` pipelines (at least the streaming ones)."""
    opened = OpenedSession(fake, "CPUExecutionProvider", ("CPUExecutionProvider",))
    shared = SharedSession(SessionKey("d", "{}", "all", "/tmp"), opened, batching, lanes, None)
    shared.users = max(users, stream_users)
    for _ in range(stream_users):
        shared.join_stream()
    return shared


def in_threads(count: int, target: Any) -> list[Any]:
    out: list[Any] = [None] * count

    def run(i: int) -> None:
        out[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


@pytest.mark.parametrize("lanes", [1, 2])
def test_runs_on_a_shared_session_never_exceed_its_lanes(lanes: int) -> None:
    fake = FakeSession()
    shared = shared_session(fake, lanes, BatchingConfig(mode="off"), users=4)
    outputs = in_threads(4, lambda i: shared.run({"x": np.full((1, 2), i, np.float32)}))
    assert [o[0].tolist() for o in outputs] == [[[2 * i] * 2] for i in range(4)]
    assert fake.most_at_once == lanes and shared.figures().runs == 4


def test_lanes_go_to_the_callers_in_the_order_they_came_so_no_pipeline_starves() -> None:
    fake = FakeSession(delay=0.01)
    shared = shared_session(fake, 1, BatchingConfig(mode="off"), users=3)
    order: list[int] = []

    def pipeline(i: int) -> None:
        for _ in range(8):
            order.append(int(shared.run({"x": np.full((1, 1), i, np.float32)})[0][0, 0]) // 2)

    in_threads(3, pipeline)
    assert sorted(order) == [0] * 8 + [1] * 8 + [2] * 8
    # A caller that just ran queues behind the ones waiting: after the first turns, strictly in turn.
    assert all(a != b for a, b in itertools.pairwise(order[3:-3])), order


def test_frames_that_pipelines_have_waiting_run_as_one_batch_and_come_back_split() -> None:
    fake = FakeSession()
    shared = shared_session(fake, 1, BatchingConfig(mode="on", latency_budget=5.0), stream_users=3)
    started = time.monotonic()
    outputs = in_threads(3, lambda i: shared.run_stream("x", np.full((1, 2), i + 1, np.float32)))
    assert [o[0].tolist() for o in outputs] == [[[2.0 * (i + 1)] * 2] for i in range(3)]
    assert fake.batches == [3]
    assert time.monotonic() - started < 4  # all three were there: nobody waited out the budget
    figures = shared.figures()
    assert (figures.batches, figures.batched_frames, figures.batching) == (1, 3, "on")


def test_a_frame_waits_for_the_other_pipelines_no_longer_than_the_latency_budget() -> None:
    fake = FakeSession(delay=0.0)
    shared = shared_session(fake, 1, BatchingConfig(mode="on", latency_budget=0.2), stream_users=2)
    started = time.monotonic()
    (out,) = shared.run_stream("x", np.ones((1, 2), np.float32))  # the other pipeline sends nothing
    waited = time.monotonic() - started
    assert out.tolist() == [[2.0, 2.0]] and fake.batches == [1]
    assert 0.15 <= waited < 5  # it waited for the budget, then ran alone


def test_a_batch_is_never_larger_than_max_size_and_always_carries_its_leader() -> None:
    fake = FakeSession()
    shared = shared_session(fake, 1, BatchingConfig(mode="on", max_size=2, latency_budget=1.0), stream_users=4)
    rows = [1, 1, 3, 1]  # a pipeline's own batch of 3 sensor windows is more than max_size: it runs alone
    outputs = in_threads(4, lambda i: shared.run_stream("x", np.full((rows[i], 2), i, np.float32)))
    assert [o[0].tolist() for o in outputs] == [[[2.0 * i] * 2] * rows[i] for i in range(4)]
    assert sum(fake.batches) == 6 and max(b for b in fake.batches if b != 3) <= 2


def test_a_model_that_fails_a_batch_runs_each_frame_alone_and_stops_batching() -> None:
    fake = FakeSession(fail_batches=True)
    shared = shared_session(fake, 1, BatchingConfig(mode="on", latency_budget=2.0), stream_users=2)
    outputs = in_threads(2, lambda i: shared.run_stream("x", np.full((1, 2), i, np.float32)))
    assert sorted(o[0].tolist() for o in outputs) == [[[0.0, 0.0]], [[2.0, 2.0]]]
    assert shared.batch_pays is False and shared.figures().batching == "off: a batched run failed"
    in_threads(2, lambda i: shared.run_stream("x", np.ones((1, 2), np.float32)))
    assert fake.batches[-2:] == [1, 1]


def test_batching_off_or_a_single_pipeline_never_batches() -> None:
    fake = FakeSession()
    off = shared_session(fake, 1, BatchingConfig(mode="off"), stream_users=3)
    in_threads(3, lambda i: off.run_stream("x", np.ones((1, 2), np.float32)))
    alone = shared_session(fake, 1, BatchingConfig(mode="on", latency_budget=5.0), stream_users=1)
    started = time.monotonic()
    alone.run_stream("x", np.ones((1, 2), np.float32))
    assert fake.batches == [1, 1, 1, 1] and time.monotonic() - started < 2  # alone, nobody to wait for


def test_auto_batching_is_judged_once_two_pipelines_stream_and_the_verdict_is_cached(tmp_path: Path) -> None:
    path = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    example = np.ones((1, 3), np.float32)
    first = load_model(path, RUNTIME, tmp_path, example=example)
    assert first.batchable and first.shared.batch_pays is None
    assert first.shared.figures().batching == "auto: not measured yet"
    second = load_model(path, RUNTIME, tmp_path, example=example)
    verdict = first.shared.figures().batching
    assert first.shared.batch_pays is not None and verdict.startswith("auto: ") and "(measured)" in verdict
    assert list((tmp_path / "autotune").glob("batch-*.json"))
    first.close()
    second.close()
    again = [load_model(path, RUNTIME, tmp_path, example=example) for _ in range(2)]
    assert "(cached)" in again[0].shared.figures().batching


def test_pipelines_sharing_a_session_report_an_even_share_of_its_memory(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 1))), tmp_path / "sum.onnx")
    sink = Recorder()
    pipes = [
        pipeline(tmp_path, sink, f"p{i}", model, {"type": "csv", "path": str(write_csv(tmp_path / f"{i}.csv", 5))})
        for i in range(2)
    ]
    stats = [p.stats() for p in pipes]
    session_mb = pipes[0].model.shared.figures().rss_mb
    assert session_mb is not None
    assert all(s["memory_mb"] == round(session_mb / 2, 1) for s in stats)
    assert all("split evenly between the 2 pipelines" in s["memory_basis"] for s in stats)
    for p in pipes:
        p.stop()
