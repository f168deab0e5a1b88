"""A start on the CPU provider while OpenVINO compiles: the rule, the switch between two runs, the stage pool
shrinking after it, the fallbacks; a successor opened afresh after a batch it will not run; and, in the
onnxruntime-openvino venv, `edge-agent run` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config.profile import RuntimeConfig
from agent.device import autotune
from agent.device.providers import CPU, OPENVINO, Candidate
from agent.device.session import OpenedSession, _opens_slowly_on_cpu, open_session
from agent.inference import interim, sessions
from agent.inference.runtime import Model, load_model
from agent.inference.sessions import POOL
from agent.inference.stagepool import Stage, StagePool
from agent.transport.contract.events import ProviderSwitched
from agent.transport.contract.wire import parse_event
from agent.transport.events import Event
from tests.helpers.broker import Mosquitto
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.profiles import validated
from tests.test_providers import OPENVINO_WHEEL, REPO, in_openvino_venv, openvino_venv, this_machine

OV_CPU = Candidate(OPENVINO, {"device_type": "CPU"}, True, "")
ON_CPU = Candidate(CPU, {}, True, "")


@pytest.mark.parametrize(
    ("chain", "interim_first"),
    [
        ([OV_CPU, ON_CPU], True),
        ([Candidate(OPENVINO, {}, True, ""), ON_CPU], True),  # OpenVINO's own default device is the CPU
        ([Candidate(OPENVINO, {"device_type": "GPU"}, True, ""), ON_CPU], False),  # a GPU run is not the CPU's
        ([Candidate("CUDAExecutionProvider", {}, True, ""), ON_CPU], False),
        ([OV_CPU], False),  # require_accelerator: nothing on the CPU provider, ever
        ([ON_CPU, OV_CPU], False),  # autotune put the CPU provider first
        ([], False),
    ],
)
def test_only_openvino_on_the_cpu_heading_a_chain_with_the_cpu_provider_starts_on_the_cpu(
    chain: list[Candidate], interim_first: bool
) -> None:
    assert _opens_slowly_on_cpu(chain) is interim_first


def model_file(tmp_path: Path, weight: float, name: str) -> Path:
    return save(linear_model(np.full((3, 1), weight, np.float32)), tmp_path / name)


@pytest.mark.arm64
def test_an_openvino_that_does_not_open_is_a_fallback_to_the_interim_cpu_session(tmp_path: Path) -> None:
    """The probe says OpenVINO is in the build; this plain wheel has none, so the session built for it
    comes up on the CPU provider, which the read-back refuses: a fallback, and the interim CPU one stays."""
    events: list[Event] = []
    hw = this_machine(OPENVINO_WHEEL)
    runtime = validated(RuntimeConfig, providers=["openvino", "cpu"])  # named: ranked on any CPU, ARM too
    path = model_file(tmp_path, 1.0, "m.onnx")
    opened = open_session(path, runtime, tmp_path / "state", events.append, probe=hw, interim=True)
    assert opened.provider == CPU and opened.upgrade is not None and events == []
    assert "the CPU provider serves while OpenVINOExecutionProvider[CPU] opens" in opened.notes
    assert opened.upgrade() is None
    (fallback,) = events
    assert fallback.type == "provider.fallback" and fallback.fields["provider"] == "OpenVINOExecutionProvider[CPU]"
    assert fallback.fields["next"] == CPU and "the session came up without it" in fallback.fields["reason"]
    # Without `interim`, or with start_on_cpu off, the chain opens as it always did: the same fallback, first.
    off = validated(RuntimeConfig, providers=["openvino", "cpu"], start_on_cpu=False)
    for settings, flag in ((runtime, False), (off, True)):
        events.clear()
        direct = open_session(path, settings, tmp_path / "state", events.append, probe=hw, interim=flag)
        assert direct.provider == CPU and direct.upgrade is None
        assert [e.fields["next"] for e in events] == [CPU]


def cpu_session(path: Path, tmp_path: Path, threads: int) -> OpenedSession:
    return open_session(path, RuntimeConfig(threads=threads), tmp_path / "other", probe=this_machine())


def served(model: Model) -> list[float]:
    return [float(model.run(np.ones((1, 3), np.float32))["y"][0, 0])]


@pytest.mark.arm64
def test_a_switch_reaches_every_pipeline_between_two_runs_and_loses_none(tmp_path: Path) -> None:
    """Three pipelines run on one session while it switches: each run ends on the session it began on, every
    run after the switch is on the new one, and no run fails. (Two models with other weights stand for
    two providers, so that each output says which session ran it.)"""
    old_path, new_path = model_file(tmp_path, 1.0, "old.onnx"), model_file(tmp_path, 2.0, "new.onnx")
    models = [load_model(old_path, RuntimeConfig(threads=1), tmp_path, name=f"p{i}") for i in range(3)]
    shared = models[0].shared
    assert all(m.shared is shared for m in models) and shared.lanes > 0
    replacement = cpu_session(new_path, tmp_path, threads=2)
    watched: list[int] = []
    POOL.watch(lambda: watched.append(1))
    outputs: list[list[float]] = [[] for _ in models]
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve(i: int) -> None:
        while not stop.is_set():
            try:
                outputs[i] += served(models[i])
            except Exception as exc:  # noqa: BLE001 (collected: the assertion below names it)
                errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    time.sleep(0.2)
    counts_before = [len(o) for o in outputs]
    replaced = POOL.switch(shared, replacement)
    assert replaced is not None and replaced.provider == CPU and replaced.session is not replacement.session
    counts_at_switch = [len(o) for o in outputs]
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert all(m.session is replacement.session and m.provider == CPU for m in models)
    assert len(watched) == 1 and shared.opened is replacement
    for out, before, at_switch in zip(outputs, counts_before, counts_at_switch, strict=True):
        flipped = out.index(6.0)  # the first run on the new session
        assert set(out[:flipped]) == {3.0} and set(out[flipped:]) == {6.0}, out
        assert before <= flipped <= at_switch + 1  # at most the run under way finished on the old one
        assert len(out) - flipped > 5  # the new session served on
    for m in models:
        m.close()
    assert POOL.switch(shared, cpu_session(old_path, tmp_path, threads=1)) is None  # nobody holds it: no switch
    assert len(watched) == 1


def fake_upgrade(result: OpenedSession | None, calls: list[int]) -> Any:
    def upgrade() -> OpenedSession | None:
        calls.append(1)
        return result

    return upgrade


@pytest.mark.arm64
def test_the_successor_opens_after_the_first_run_warms_up_on_its_input_then_serves(tmp_path: Path) -> None:
    events: list[Event] = []
    calls: list[int] = []
    model = load_model(model_file(tmp_path, 1.0, "m.onnx"), RuntimeConfig(threads=1), tmp_path, warmup_runs=0)
    successor = cpu_session(model_file(tmp_path, 2.0, "n.onnx"), tmp_path, threads=2)
    thread_count = threading.active_count()
    interim.upgrade_when_served(POOL, model.shared, fake_upgrade(successor, calls), None, events.append, "m")
    time.sleep(0.3)
    assert calls == [] and threading.active_count() == thread_count + 1  # waiting for the first run
    assert served(model) == [3.0]
    deadline = time.monotonic() + 30  # emulated aarch64 is slow
    while not events and time.monotonic() < deadline:  # the event comes right after the switch
        time.sleep(0.01)
    assert calls == [1] and model.session is successor.session and served(model) == [6.0]
    deadline = time.monotonic() + 30
    while model.shared.successor_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.shared.first is None  # the first frame's input is not held once the successor is in
    (switched,) = events
    assert switched.type == "provider.switched" and switched.fields["model"] == "m"
    assert switched.fields["previous"] == CPU and 0 <= switched.fields["seconds"] < 10
    model.close()


@pytest.mark.arm64
def test_batching_is_judged_on_the_session_that_stays_never_on_the_interim_one(tmp_path: Path) -> None:
    """Two pipelines stream into the interim session: its first runs do not measure a batch (the session is
    about to go); the successor is measured once it serves."""
    path = model_file(tmp_path, 1.0, "m.onnx")
    models = [load_model(path, RuntimeConfig(threads=1), tmp_path, warmup_runs=0) for _ in range(2)]
    shared = models[0].shared
    assert all(m.batchable and m.shared is shared for m in models)
    successor = cpu_session(path, tmp_path, threads=2)
    events: list[Event] = []
    interim.upgrade_when_served(POOL, shared, fake_upgrade(successor, []), None, events.append, "m")
    for m in models:
        assert served(m) == [3.0]
    deadline = time.monotonic() + 60  # emulated aarch64 is slow; the judge comes after the switch
    while shared.batch_pays is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shared.session is successor.session and shared.batch_pays is not None
    assert "(measured)" in shared.figures().batching
    (verdict,) = (tmp_path / "autotune").glob("batch-*.json")
    assert "CPU" in verdict.name
    for m in models:
        m.close()


def fresh_sessions(path: Path, tmp_path: Path, opened: list[weakref.ref[Any]], alive: list[int]) -> Any:
    """An upgrade that opens a new session at every call, noting how many of those it opened are alive."""

    def upgrade() -> OpenedSession:
        alive.append(sum(ref() is not None for ref in opened))
        session = cpu_session(path, tmp_path, threads=1)
        opened.append(weakref.ref(session.session))
        return session

    return upgrade


@pytest.mark.arm64
@pytest.mark.parametrize("pays", [False, True])
def test_a_session_left_holding_a_batch_it_will_not_run_is_opened_afresh_by_way_of_the_cpu_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pays: bool
) -> None:
    """Where a provider keeps a batch's buffers (OpenVINO; the CPU provider stands in here), whether a batch
    pays is measured once its session serves and the interim CPU session is gone (the two sessions and the
    batch never held at once). One that measured a batch it will not run hands over to the CPU provider's
    session opened again, is freed, and the provider opens afresh: never two of its sessions at once, never
    none serving. The verdict stays; a later start reads it, and opens the provider once."""
    monkeypatch.setattr(interim, "KEEPS_BATCH_MEMORY", frozenset({CPU}))
    monkeypatch.setattr(autotune, "BATCH_GAIN", 1e9 if pays else 0.0)
    interim_session: list[weakref.ref[Any]] = []
    measured_beside_it: list[bool] = []
    real_judge = sessions.judge_batching

    def judge(session: Any, *args: Any) -> Any:
        measured_beside_it.append(interim_session[-1]() is not None)
        return real_judge(session, *args)

    monkeypatch.setattr(sessions, "judge_batching", judge)
    path = model_file(tmp_path, 1.0, "m.onnx")
    for start in ("first", "later"):
        models = [load_model(path, RuntimeConfig(threads=1), tmp_path, warmup_runs=0) for _ in range(2)]
        shared = models[0].shared
        interim_session.append(weakref.ref(shared.session))
        opened: list[weakref.ref[Any]] = []
        alive: list[int] = []
        again: list[int] = []

        def reopen() -> OpenedSession:
            again.append(sum(ref() is not None for ref in opened))  # noqa: B023 (called before the loop goes on)
            return cpu_session(path, tmp_path, threads=1)

        upgrade = fresh_sessions(path, tmp_path, opened, alive)
        interim.upgrade_when_served(POOL, shared, upgrade, reopen, lambda e: None, "m")
        for m in models:
            assert served(m) == [3.0]
        (thread,) = [t for t in threading.enumerate() if t.name == "session-upgrade"]
        thread.join(60)  # emulated aarch64 is slow
        renewed = start == "first" and not pays
        assert alive == ([0, 0] if renewed else [0]), alive  # the measured one was gone before the next opened
        assert again == ([1] if renewed else []), again  # the CPU provider's opened beside the measured one
        assert shared.session is opened[-1]() and (opened[0]() is None) == renewed
        assert measured_beside_it == [False] * (1 if start == "first" else 2), measured_beside_it
        figures = shared.figures().batching
        assert shared.batch_pays is pays and ("(measured)" if start == "first" else "(cached)") in figures, figures
        assert [served(m) for m in models] == [[3.0], [3.0]]
        for m in models:
            m.close()


@pytest.mark.arm64
def test_a_session_let_go_before_its_first_run_never_opens_its_successor(tmp_path: Path) -> None:
    calls: list[int] = []
    model = load_model(model_file(tmp_path, 1.0, "m.onnx"), RuntimeConfig(threads=1), tmp_path, warmup_runs=0)
    interim.upgrade_when_served(POOL, model.shared, fake_upgrade(None, calls), None, lambda e: None, "m")
    (thread,) = [t for t in threading.enumerate() if t.name == "session-upgrade"]
    model.close()
    thread.join(1.0)  # well before FIRST_RUN_WAIT_S: the release woke it
    assert not thread.is_alive() and calls == []


@pytest.mark.arm64
def test_a_successor_that_fails_the_first_input_is_a_fallback_and_the_cpu_session_serves_on(tmp_path: Path) -> None:
    events: list[Event] = []
    model = load_model(model_file(tmp_path, 1.0, "m.onnx"), RuntimeConfig(threads=1), tmp_path, warmup_runs=0)
    wrong = save(linear_model(np.ones((5, 1), np.float32)), tmp_path / "wrong.onnx")  # takes 5 values, not 3
    interim.upgrade_when_served(
        POOL, model.shared, fake_upgrade(cpu_session(wrong, tmp_path, 1), []), None, events.append, "m"
    )
    first = model.session
    assert served(model) == [3.0]
    deadline = time.monotonic() + 30  # emulated aarch64 is slow
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    (fallback,) = events
    assert fallback.type == "provider.fallback" and fallback.fields["next"] == CPU
    assert fallback.fields["reason"].startswith("its first run failed: ")
    while model.shared.successor_pending and time.monotonic() < deadline:  # the thread ends after the event
        time.sleep(0.01)
    assert model.session is first and served(model) == [3.0] and model.shared.first is None
    model.close()


def test_workers_above_what_the_sessions_take_leave_after_a_switch_and_the_stages_run_on() -> None:
    lanes = [2]
    pool = StagePool(size=lambda: 2, lanes=lambda: lanes[0])
    ran = {"infer": 0, "post": 0}
    lock = threading.Lock()

    def step(kind: str) -> Any:
        def run() -> None:
            time.sleep(0.002)
            with lock:
                ran[kind] += 1

        return run

    stages = [Stage(f"infer{i}", lambda: True, step("infer"), heavy=True) for i in range(3)]
    stages.append(Stage("post", lambda: True, step("post")))
    pool.attach(stages)
    assert pool.workers == 3 and pool.inference_slots == 2
    lanes[0] = 1  # the CPU session switched to OpenVINO: one run at a time
    pool.resize()
    deadline = time.monotonic() + 5
    while pool.workers > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.workers == 2 and pool.inference_slots == 1
    with lock:
        before = dict(ran)
    time.sleep(0.2)
    with lock:
        assert ran["infer"] > before["infer"] and ran["post"] > before["post"]
    pool.detach(stages)


# ---- OpenVINO, for real: `edge-agent run` in the onnxruntime-openvino venv ----------------------------


def agent_profile(tmp_path: Path, runtime: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """A profile: 40 frames of the synthetic camera into the PP-OCR detector, `extra` sections added."""
    from agent.cloud.samples import sample_model
    from bench.bench_pipeline import OCR_PRE

    profile = tmp_path / "profile.yaml"
    profile.write_text(
        json.dumps(
            {
                **(extra or {}),
                "device": {"id": "ov", "state_dir": str(tmp_path / "state")},
                "runtime": runtime,
                "pipelines": [
                    {
                        "name": "cam",
                        "model": str(sample_model("ppocr-det", quiet=True)),
                        "source": {"type": "synthetic", "frames": 40, "fps": 10},
                        "preprocess": OCR_PRE,
                        "postprocess": {"type": "text-detection"},
                    }
                ],
            }
        )
    )
    return profile


def run_agent(tmp_path: Path, runtime: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """`edge-agent run` on `agent_profile`: its results, and its events as the journal has them
    (`type=... field=...`)."""
    out = in_openvino_venv("-m", "agent", "run", "--profile", str(agent_profile(tmp_path, runtime)), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    events = [line.split("event type=", 1)[1] for line in out.stderr.splitlines() if "event type=" in line]
    return results, events


def providers_in_order(results: list[dict[str, Any]]) -> list[str]:
    """The providers that ran the frames, each run of repeats folded: [CPU, OpenVINO] for one switch."""
    seen: list[str] = []
    for r in results:
        if not seen or seen[-1] != r["provider"]:
            seen.append(r["provider"])
    return seen


@pytest.mark.slow
def test_a_start_serves_on_the_cpu_provider_then_switches_to_openvino_losing_no_frame(
    tmp_path: Path,
) -> None:
    results, events = run_agent(tmp_path, {})
    assert sorted(r["source_seq"] for r in results) == list(range(40))  # none lost, none twice
    assert providers_in_order(results) == [CPU, OPENVINO], [r["provider"] for r in results]
    (switched,) = [e for e in events if e.startswith("provider.switched ")]
    assert f"provider='{OPENVINO}'" in switched and f"previous='{CPU}'" in switched
    assert not [e for e in events if e.startswith(("provider.fallback", "inference.error"))], events
    # The next start does the same from the caches (the CPU provider's optimised graph, OpenVINO's blob).
    again, _ = run_agent(tmp_path, {})
    assert providers_in_order(again) == [CPU, OPENVINO] and len(again) == 40


@pytest.mark.slow
def test_the_switch_reaches_the_cloud_as_the_contract_says(tmp_path: Path, broker: Mosquitto) -> None:
    """A real agent's `provider.switched` over MQTT, read as the fleet side reads events."""
    profile = agent_profile(tmp_path, {}, {"mqtt": {"url": broker.url}})
    sub = Subscriber(broker.port, "edge/ov/events")
    # With a broker the daemon serves on after its camera's last frame: stopped once the switch is out.
    agent = subprocess.Popen(
        [openvino_venv(), "-m", "agent", "run", "--profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        switched_out = sub.wait_for(
            lambda: any(b'"provider.switched"' in m.payload for m in sub.on("edge/ov/events")), 120
        )
        events = [parse_event(bytes(m.payload)) for m in sub.on("edge/ov/events")]
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=60)
        sub.close()
    assert switched_out, stderr[-3000:]
    (switched,) = [e.body for e in events if isinstance(e.body, ProviderSwitched)]
    assert (switched.provider, switched.previous, switched.model) == (OPENVINO, CPU, "ppocr-det"), switched
    assert 0 < switched.seconds < 60


@pytest.mark.slow
def test_start_on_cpu_off_serves_every_frame_on_openvino(tmp_path: Path) -> None:
    results, events = run_agent(tmp_path, {"start_on_cpu": False})
    assert len(results) == 40 and providers_in_order(results) == [OPENVINO]
    assert not [e for e in events if e.startswith("provider.switched")]


@pytest.mark.slow
def test_an_openvino_that_comes_up_without_its_provider_is_a_fallback_and_the_cpu_serves_every_frame(
    tmp_path: Path,
) -> None:
    """An option OpenVINO does not know makes onnxruntime drop the provider quietly: the read-back finds
    the session on the CPU provider, so the switch never happens."""
    results, events = run_agent(tmp_path, {"providers": [{"openvino": {"precision": "BOGUS"}}]})
    assert len(results) == 40 and providers_in_order(results) == [CPU]
    (fallback,) = [e for e in events if e.startswith("provider.fallback")]
    assert "OpenVINOExecutionProvider[CPU]" in fallback and f"next='{CPU}'" in fallback
    assert not [e for e in events if e.startswith("provider.switched")]
