"""One session per model and provider, shared by every pipeline that runs that model.

Four cameras on one detector hold one copy of its weights, one arena and one thread pool sized to the
device's budget, instead of four of each. A shared session serves its pipelines in *lanes*: on CPU
providers up to one run per core of the budget at once (each with its share of the threads when several
cameras share the model: `providers.run_threads`, `SessionPool.plan`), one at a time on accelerators
and OpenVINO, which batch or spread one run over their own threads instead.

Dynamic batching: when several pipelines have frames waiting on a model that takes a batch (a free
first dimension, no recurrent state, no constants), the first one to run takes the others' frames along
as one batch, after waiting at most `runtime.batching.latency_budget` for the pipelines not yet waiting.
`auto` batches only where a measurement on this device says a batch costs less per frame than single
runs (agent.device.autotune.judge_batching, cached): on a 2-core EPYC a batch of 4 PP-OCR frames costs
more per frame than 4 single runs, while a GPU gains several times.

A hot swap stays per pipeline: a new version is a new key, each pipeline switches between two of its
frames, and the old session is freed when the last pipeline lets go of it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from agent.config.base import plain
from agent.config.runtime import BatchingConfig, Optimization, RuntimeConfig
from agent.device import hardware
from agent.device.autotune import BatchVerdict, batch_cache_path, cpu_bound, judge_batching, model_digest
from agent.device.build import OWN_THREADS
from agent.device.customops import library_digests
from agent.device.providers import Candidate, core_budget
from agent.device.session import OpenedSession, open_session
from agent.inference.interim import upgrade_when_served
from agent.transport.events import EventSink, log_event
from agent.util.rss import rss_bytes

if TYPE_CHECKING:
    from agent.inference.processing.post.base import OutputValue

log = logging.getLogger(__name__)


class NodeArg(Protocol):
    """One input or output of an ONNX Runtime session, as `get_inputs()` describes it."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> list[int | str | None] | None: ...
    @property
    def type(self) -> str: ...


class Session(Protocol):
    """What a `Model` uses of an `onnxruntime.InferenceSession` (which ships no type hints)."""

    def get_inputs(self) -> Sequence[NodeArg]: ...
    def get_outputs(self) -> Sequence[NodeArg]: ...
    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray]) -> list[OutputValue]: ...


class _Request:
    """Rows of one pipeline's stream input, waiting to run alone or in another pipeline's batch."""

    __slots__ = ("done", "error", "outputs", "taken", "x")

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.taken = False
        self.done = threading.Event()
        self.outputs: list[OutputValue] | None = None
        self.error: BaseException | None = None

    def fits(self, other: _Request) -> bool:
        return self.x.shape[1:] == other.x.shape[1:] and self.x.dtype == other.x.dtype


@dataclass(frozen=True)
class SessionKey:
    """What makes two pipelines' sessions the same: the model's bytes, the runtime settings, the level, and
    the custom-op libraries registered with it (two versions of identical bytes may bring other ones)."""

    digest: str
    runtime: str  # RuntimeConfig as JSON: its option dicts make it unhashable as it is
    optimization: str
    state_dir: str
    libraries: tuple[str, ...] = ()  # sha256 of each custom-op library (agent.device.customops.library_digests)


@dataclass(frozen=True)
class SessionFigures:
    """A shared session in health: who shares it, how it ran, and the memory it took when it loaded."""

    provider: str
    pipelines: int
    lanes: int
    runs: int
    batches: int  # runs that carried frames of more than one pipeline
    batched_frames: int
    batching: str  # "off", "on", "auto: pays", "auto: does not pay (...)", "auto: not measured yet"
    rss_mb: float | None


class SharedSession:
    """An ONNX Runtime session and the pipelines that lease it; `run` and `run_stream` are thread-safe."""

    def __init__(
        self, key: SessionKey, opened: OpenedSession, batching: BatchingConfig, lanes: int, rss_before: int | None
    ) -> None:
        self.key = key
        self.opened = opened
        self.session: Session = opened.session
        self.provider = opened.provider
        self.batching = batching
        self.lanes = max(1, lanes)
        self._rss_before = rss_before  # the process's RSS before the load
        self._settled = False
        self.rss_bytes: int | None = None
        self.settle_memory(final=False)
        # An interim CPU session (`OpenedSession.upgrade`): its first run's feeds warm its successor up.
        self.first: tuple[str, dict[str, np.ndarray]] | None = None
        self.successor_pending = False  # set by agent.inference.interim until the successor is in or given up
        self.wake = threading.Event()  # the first run is done, or nobody holds the session any more
        self.users = 0
        self.stream_users = 0  # users whose frames may join a batch
        self.batch_pays: bool | None = None if batching.mode == "auto" else batching.mode == "on"
        self._verdict = ""
        self._cond = threading.Condition()
        self._running = 0
        self._collecting = False
        self._waiting: deque[_Request] = deque()  # frames that may join a batch, oldest first
        self._line: deque[object] = deque()  # callers waiting for a lane, served first come first served
        self.runs = self.batches = self.batched_frames = 0

    # -- running -----------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[OutputValue]:
        """One run of these feeds in a free lane (waiting for one)."""
        if self.users <= 1 and not self._running and not self._line:
            # One pipeline, nobody else running: a sensor pipeline runs a tiny model thousands of times a
            # second, and the lane's bookkeeping would cost it more than the run itself.
            self.runs += 1
            return self.session.run(None, feeds)
        with self._lane():
            return self.session.run(None, feeds)

    def run_stream(self, name: str, x: np.ndarray, company: int | None = None) -> list[OutputValue]:
        """The stream input `x` (rows along its first axis) run, together with the rows other pipelines
        have waiting when batching is on; the outputs hold `x`'s rows only.

        `company`: how many pipelines' frames (this one's included) can be here at once, when fewer than
        the stream users; a leader never waits for frames that cannot come (camera pipelines on the
        shared workers run as many inferences at once as the workers allow)."""
        if not self.batch_pays or self.stream_users < 2:
            return self.run({name: x})
        request = _Request(x)
        batch: list[_Request] = []
        with self._cond:
            self._waiting.append(request)
            self._line.append(request)
            self._cond.notify_all()  # a leader collecting a batch takes this one along now
            while not request.taken and (self._collecting or not self._lane_free(request)):
                self._cond.wait()
            if not request.taken:  # this thread leads: it runs its frames and those it takes along
                self._take_lane()
                self._collecting = True
                batch = self._collect(request, company)
        if batch:
            try:
                self._run_batch(name, batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self.runs += 1
                    if len(batch) > 1:
                        self.batches += 1
                        self.batched_frames += sum(len(r.x) for r in batch)
                    self._cond.notify_all()
                for taken in batch:
                    taken.done.set()
        else:
            request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs

    def _collect(self, leader: _Request, company: int | None) -> list[_Request]:
        """The leader's request, then the fitting ones waiting, up to `max_size` rows in all; waits up to the
        latency budget for the stream users not waiting yet. Called holding the lock."""
        self._waiting.remove(leader)
        leader.taken = True
        batch = [leader]
        rows = len(leader.x)
        deadline = time.monotonic() + self.batching.latency_budget
        while True:
            wanted = min(self.stream_users, company or self.stream_users)
            for request in list(self._waiting):
                if request.fits(leader) and rows + len(request.x) <= self.batching.max_size:
                    self._waiting.remove(request)
                    self._line.remove(request)
                    request.taken = True
                    batch.append(request)
                    rows += len(request.x)
            remaining = deadline - time.monotonic()
            if len(batch) >= wanted or rows >= self.batching.max_size or remaining <= 0:
                break
            self._cond.wait(remaining)
        self._collecting = False
        self._cond.notify_all()
        return batch

    def _run_batch(self, name: str, batch: list[_Request]) -> None:
        try:
            if len(batch) == 1:
                batch[0].outputs = self.session.run(None, {name: batch[0].x})
                return
            values = self.session.run(None, {name: np.concatenate([r.x for r in batch], axis=0)})
            rows = sum(len(r.x) for r in batch)
            if any(len(v) != rows for v in values):
                raise ValueError(f"an output does not have one row per input row ({rows})")
            start = 0
            for request in batch:
                end = start + len(request.x)
                request.outputs = [v[start:end] for v in values]
                start = end
        except Exception as exc:  # noqa: BLE001 (ORT's errors derive from Exception: each frame is run alone)
            if len(batch) == 1:
                batch[0].error = exc
                return
            log.warning("batched run failed, batching stops for this model reason=%s", str(exc).strip()[:200])
            self.batch_pays, self._verdict = False, "off: a batched run failed"
            for request in batch:
                try:
                    request.outputs = self.session.run(None, {name: request.x})
                except Exception as single:  # noqa: BLE001 (as above: the frame's own error goes to its pipeline)
                    request.error = single

    def _lane_free(self, ticket: object, lanes: int = 1) -> bool:
        """`lanes` are free and `ticket` is first in line: no caller overtakes one that waits longer (with
        more pipelines than lanes, a pipeline that just ran would otherwise win every race)."""
        return self._running + lanes <= self.lanes and self._line[0] is ticket

    def _take_lane(self, lanes: int = 1) -> None:
        self._line.popleft()
        self._running += lanes
        self._cond.notify_all()  # the next in line may find a lane free too

    @contextmanager
    def _lane(self, every: bool = False) -> Iterator[None]:
        """A lane, first come first served; `every` one of them, for a measure that must run alone."""
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            while not self._lane_free(ticket, taken := self.lanes if every else 1):
                self._cond.wait()
            self._take_lane(taken)
        try:
            yield
        finally:
            with self._cond:
                self._running -= taken
                self.runs += 1
                self._cond.notify_all()

    def join_stream(self) -> None:
        """A pipeline whose frames may join batches: leaders wait for up to this many."""
        with self._cond:
            self.stream_users += 1

    def leave_stream(self) -> None:
        with self._cond:
            self.stream_users -= 1
            self._cond.notify_all()  # a leader waiting for this pipeline's frames stops waiting

    # -- batching ----------------------------------------------------------------------------------

    def judge(self, name: str, example: np.ndarray, verdict: BatchVerdict | None = None) -> None:
        """With `auto`, measure once (per model and device, cached) whether a batch of the stream users'
        frames runs cheaper per frame than single runs; only once two pipelines stream into this session.
        `verdict`: the one measured already (agent.inference.interim)."""
        if self.successor_pending:  # an interim session: the one that stays is judged (agent.inference.interim)
            return
        verdict = verdict or self.batching_verdict(name, example)
        if verdict is None:
            return
        self.batch_pays = verdict.pays
        self._verdict = verdict.describe()
        log.info("batching %s provider=%s %s", "on" if verdict.pays else "off", self.provider, self._verdict)

    def batching_verdict(self, name: str, example: np.ndarray) -> BatchVerdict | None:
        """Whether a batch of the stream users' frames pays on this session, measured or cached; None where
        `auto` has nothing to judge. The measure holds every lane: runs beside it would time the cores'
        sharing, not the batch."""
        if not self._judging:
            return None
        size = min(self.stream_users, self.batching.max_size)
        with self._lane(every=True):
            path = batch_cache_path(Path(self.key.state_dir), self.key.digest, hardware.probe(), self.provider)
            return judge_batching(self.session, name, example[:1], size, path)

    @property
    def _judging(self) -> bool:
        return self.batching.mode == "auto" and self.batch_pays is None and self.stream_users >= 2

    def settle_memory(self, final: bool = True) -> None:
        """The session's memory: what the process grew by from before its load (weights, pool) to the end
        of its first warm-up (the arena), measured once (again after a switch of provider); pipelines
        apportion it evenly."""
        if self._settled:
            return
        before, now = self._rss_before, rss_bytes()
        if before is not None and now is not None:
            self.rss_bytes = max(0, now - before)
        self._settled = final

    # -- an interim CPU session and its successor ---------------------------------------------------

    def first_run(self, stream_input: str, feeds: Mapping[str, np.ndarray]) -> None:
        """The first real run on an interim session is done (`Model`): its successor may open now, and warm
        up on these feeds (kept until then only: a camera frame's input is megabytes)."""
        if self.first is None:
            self.first = (stream_input, dict(feeds))
        self.wake.set()

    def switch(self, opened: OpenedSession, lanes: int) -> OpenedSession:
        """Serve from `opened` from the next run on; runs under way finish on the session they started on.
        Returns the session switched from."""
        with self._cond:
            previous = self.opened
            self.opened, self.session, self.provider, self.lanes = opened, opened.session, opened.provider, lanes
            if self.batching.mode == "auto":  # the verdict was the other provider's
                self.batch_pays, self._verdict = None, ""
            self._settled = False
            self._cond.notify_all()  # callers waiting for a lane see the new count
        return previous

    # -- figures -----------------------------------------------------------------------------------

    def figures(self) -> SessionFigures:
        mode = self.batching.mode
        if mode == "auto":
            batching = f"auto: {self._verdict}" if self._verdict else "auto: not measured yet"
        else:
            batching = self._verdict or mode
        return SessionFigures(
            provider=self.provider,
            pipelines=self.users,
            lanes=self.lanes,
            runs=self.runs,
            batches=self.batches,
            batched_frames=self.batched_frames,
            batching=batching,
            rss_mb=round(self.rss_bytes / 2**20, 1) if self.rss_bytes is not None else None,
        )


class SessionPool:
    """The shared sessions of one process, by key; a session lives while a pipeline leases it."""

    def __init__(self) -> None:
        # Re-entrant: a model collected while this thread holds the lock gives its lease back through it.
        self._lock = threading.RLock()
        self._sessions: dict[SessionKey, SharedSession] = {}
        self._loading: dict[SessionKey, threading.Lock] = {}
        self._at_once = 1
        self._watchers: list[Callable[[], None]] = []

    def watch(self, callback: Callable[[], None]) -> None:
        """`callback()` after a session switched provider: the lanes it takes changed (the stage pool)."""
        self._watchers.append(callback)

    def plan(self, at_once: int) -> None:
        """How many inferences the pipelines will run at once (the daemon's camera pipelines): CPU sessions
        opened from now on give each run its share of the thread budget. A session keeps the threads it was
        opened with: a reload that adds cameras resizes the models it loads, not those already shared."""
        self._at_once = max(1, at_once)

    @property
    def at_once(self) -> int:
        """The camera pipelines planned: with one, no batch of several frames can reach a session."""
        return self._at_once

    def acquire(
        self,
        source: Path | bytes,
        runtime: RuntimeConfig,
        state_dir: Path,
        *,
        optimization: Optimization | None = None,
        emit: EventSink = log_event,
        digest: str | None = None,
        interim: bool = False,
        label: str = "model",
    ) -> SharedSession:
        """The session for this model and settings, opened now or shared with the pipelines holding it;
        pair each acquire with one `release`. `digest`: the model's sha256, when the caller has it.

        `interim` (a start): where the provider chosen is slow to open, the session starts on the CPU
        provider and switches to the chosen one between two runs once it has opened and run the first
        frame's input (`provider.switched`, naming the model `label`); see `open_session`."""
        digest = digest or model_digest(source)
        level = optimization or runtime.optimization
        libraries = library_digests(source, runtime.custom_ops)
        key = SessionKey(
            digest, json.dumps(plain(runtime), sort_keys=True), level, str(Path(state_dir).absolute()), libraries
        )
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # a second pipeline on the same model waits for the first one's load, then shares it
            with self._lock:
                shared = self._sessions.get(key)
                if shared is not None:
                    shared.users += 1
                    return shared
            before = rss_bytes()
            try:
                opened = open_session(
                    source,
                    runtime,
                    Path(state_dir),
                    emit,
                    optimization=level,
                    digest=digest,
                    at_once=self._at_once,
                    interim=interim,
                )
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            shared = SharedSession(key, opened, runtime.batching, _lanes(opened), before)
            with self._lock:
                self._sessions[key] = shared
                shared.users += 1
            if opened.upgrade is not None:
                upgrade_when_served(self, shared, opened.upgrade, opened.again, emit, label)
            return shared

    def release(self, shared: SharedSession) -> None:
        with self._lock:
            shared.users -= 1
            if shared.users <= 0 and self._sessions.get(shared.key) is shared:
                del self._sessions[shared.key]
                shared.wake.set()  # an upgrade still waiting for the first run gives up

    def switch(self, shared: SharedSession, opened: OpenedSession) -> OpenedSession | None:
        """`shared` serves from `opened` from its next run on (agent.inference.interim), unless no pipeline
        holds it any more; the session it switched from, or None."""
        with self._lock:
            if self._sessions.get(shared.key) is not shared:
                return None
            previous = shared.switch(opened, _lanes(opened))
        for watcher in self._watchers:
            watcher()
        return previous

    def holds(self, shared: SharedSession) -> bool:
        """Some pipeline still holds `shared`."""
        with self._lock:
            return self._sessions.get(shared.key) is shared

    def lanes(self) -> int | None:
        """The runs the open sessions take at once, together; None when none is open."""
        with self._lock:
            return sum(s.lanes for s in self._sessions.values()) or None

    def sessions(self) -> Sequence[SharedSession]:
        with self._lock:
            return list(self._sessions.values())


def _lanes(opened: OpenedSession) -> int:
    """Runs a session takes at once: one per core of the budget on CPU providers; one where the provider
    runs each inference on a pool or device of its own (OpenVINO spreads one run over all the budget's
    cores: two at once only wait on each other's threads, and hold two sets of activations)."""
    parallel = cpu_bound(Candidate(opened.provider, opened.options, True, "")) and opened.provider not in OWN_THREADS
    return core_budget() if parallel else 1


POOL = SessionPool()  # the process's pool: every pipeline of a daemon shares through it
