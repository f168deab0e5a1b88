"""A loaded model: its session (shared between the pipelines that run it, see `sessions`; always built
through `agent.device.session.open_session`), its input and output signature, warm-up, and runs with
constant inputs and recurrent state.

The pipeline owns one `Model` at a time and a `ModelState` beside it; a hot swap loads and warms a
second `Model` while the first keeps serving, then the pipeline replaces both between two frames.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.config.profile import Constant
from agent.config.runtime import LocalLibrary, Optimization, RuntimeConfig
from agent.device import compat, customops, graphprep
from agent.device.autotune import model_digest
from agent.device.graphprep import Rewritten, StreamPlan
from agent.device.onnxproto import WireError
from agent.inference.processing.pre import NUMPY_TYPES
from agent.inference.sessions import POOL, NodeArg, Session, SessionPool, SharedSession
from agent.inference.stats import MemoryShare
from agent.transport.events import EventSink, log_event
from agent.util.timeline import START

if TYPE_CHECKING:
    from agent.inference.processing.post.base import OutputValue

log = logging.getLogger(__name__)

# Dynamic spatial dimensions get this size when a model is warmed without an example input: large
# enough for detectors that downsample by 32, small enough to be quick.
WARMUP_SPATIAL = 64


class ModelError(Exception):
    """The model cannot serve this pipeline: it failed to load, to warm up, or its signature misses a name."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...] | None  # None for non-tensor values (sequences of maps)
    type: str  # ONNX Runtime's type string, e.g. tensor(float), seq(map(int64,tensor(float)))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(NUMPY_TYPES.get(self.type, "float32"))

    def example(self) -> np.ndarray:
        """Zeros of this shape: dynamic image dims WARMUP_SPATIAL, dynamic batch and other dims 1."""
        dims = list(self.shape or ())
        out: list[int] = []
        for i, d in enumerate(dims):
            if d is not None:
                out.append(d)
            elif len(dims) == 4 and i >= 2:
                out.append(WARMUP_SPATIAL)
            else:
                out.append(1)
        return np.zeros(out, dtype=self.dtype)


def _spec(arg: NodeArg) -> TensorSpec:
    dims = arg.shape
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims) if isinstance(dims, list) else None
    return TensorSpec(arg.name, shape, arg.type)


def constant_tensor(spec: TensorSpec, value: Constant) -> np.ndarray:
    """A profile constant (`inputs: {sr: 16000}`) shaped and typed as the model input wants it."""
    arr = np.asarray(value, dtype=spec.dtype)
    shape = spec.shape or ()
    if arr.ndim == len(shape):
        return arr
    fixed = [d for d in shape if d is not None]
    if len(fixed) == len(shape) and int(np.prod(fixed)) == arr.size:
        return arr.reshape(fixed)
    while arr.ndim < len(shape):
        arr = arr[None]
    return arr


@dataclass
class ModelState:
    """Recurrent inputs carried from one step to the next (input name -> tensor)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)


class Model:
    """One pipeline's view of a shared session (agent.inference.sessions): its stream input, constants and
    state. `close()` (or garbage collection) gives the session back to the pool."""

    def __init__(
        self,
        shared: SharedSession,
        name: str,
        version: str,
        constants: Mapping[str, Constant] | None = None,
        state: Mapping[str, str] | None = None,
        stream_input: str | None = None,
        pool: SessionPool = POOL,
        takes_frames: bool = False,
    ) -> None:
        self.shared = shared
        self.takes_frames = takes_frames  # the stream input takes BGR frames (agent.device.graphprep)
        self.name = name
        self.version = version
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self.output_names = list(self.outputs)
        # The lease ends with close() or when the model is collected, whichever comes first.
        self._lease = weakref.finalize(self, pool.release, shared)
        self._warm = False  # until the first run (a warm-up's, or the first frame's) is done
        self._streaming: weakref.finalize[[], Model] | None = None
        try:
            self._check_signature(dict(constants or {}), dict(state or {}), stream_input)
        except ModelError:
            self.close()
            raise
        if self.batchable:
            shared.join_stream()
            self._streaming = weakref.finalize(self, shared.leave_stream)

    @property
    def session(self) -> Session:
        """The shared session's ONNX Runtime session: an interim CPU one is switched for the provider chosen."""
        return self.shared.session

    @property
    def provider(self) -> str:
        return self.shared.provider

    def _check_signature(self, constants: dict[str, Constant], state: dict[str, str], stream_input: str | None) -> None:
        name = self.name
        for input_name in list(constants) + list(state):
            if input_name not in self.inputs:
                raise ModelError(f"model {name} has no input {input_name!r} (inputs: {', '.join(self.inputs)})")
        for output_name in state.values():
            if output_name not in self.outputs:
                raise ModelError(
                    f"model {name} has no output {output_name!r} to carry as state (outputs: {', '.join(self.outputs)})"
                )
        self.state_map = state
        self.constants = {k: constant_tensor(self.inputs[k], v) for k, v in constants.items()}
        free = [n for n in self.inputs if n not in self.constants and n not in state]
        if stream_input is not None and stream_input not in free:
            raise ModelError(
                f"model {name} has no input {stream_input!r} for the stream (free inputs: {', '.join(free) or 'none'})"
            )
        if stream_input is None:
            if len(free) != 1:
                raise ModelError(
                    f"model {name} has {len(free)} inputs without a value ({', '.join(free)}); give the others in "
                    "`inputs` (constants) or `state`, or name the stream's with preprocess.input"
                )
            stream_input = free[0]
        self.stream_input = stream_input
        self.stream_spec = self.inputs[stream_input]
        stream_shape = self.stream_spec.shape
        self.batchable = (
            not state
            and not self.constants
            and bool(stream_shape)
            and stream_shape is not None
            and stream_shape[0] is None
            and all(
                (o.shape is not None and len(o.shape) > 0 and o.shape[0] is None) or o.type.startswith("seq(")
                for o in self.outputs.values()
            )
        )

    def memory_share(self) -> MemoryShare:
        """This pipeline's share of its session's memory (MiB): weights, arena and pool belong to the
        session, not to one pipeline, so a shared session is split evenly."""
        figures = self.shared.figures()
        if figures.rss_mb is None:
            return {"memory_mb": None, "memory_basis": "not measured (the process's memory could not be read)"}
        users = max(1, figures.pipelines)
        basis = f"the session's {figures.rss_mb:.1f} MiB (process growth over its load and first warm-up)"
        if users > 1:
            basis += f", split evenly between the {users} pipelines sharing it"
        return {"memory_mb": round(figures.rss_mb / users, 1), "memory_basis": basis}

    def close(self) -> None:
        """Give the session back: the pool frees it when no pipeline holds it any more."""
        if self._streaming is not None:
            self._streaming()
        self._lease()

    def new_state(self) -> ModelState:
        return ModelState({k: self.inputs[k].example() for k in self.state_map})

    def run(self, x: np.ndarray, state: ModelState | None = None, company: int | None = None) -> dict[str, OutputValue]:
        """One run of the stream input `x`; `company` as in `SharedSession.run_stream`."""
        if self.batchable:
            values = self.shared.run_stream(self.stream_input, x, company)
        else:
            feeds = {self.stream_input: x}
            if self.constants:
                feeds.update(self.constants)
            if self.state_map:
                assert state is not None, "a model with state needs a ModelState"
                feeds.update(state.values)
            values = self.shared.run(feeds)
        out = dict(zip(self.output_names, values, strict=True))
        if self.state_map:
            assert state is not None
            state.values = {k: np.asarray(out[v]) for k, v in self.state_map.items()}
        if not self._warm:
            self._warmed(x, "1 run: the first frame")
        return out

    def run_batch(self, xs: Sequence[np.ndarray]) -> list[dict[str, OutputValue]]:
        """Several stream inputs (each with a batch dimension of 1) in one run, split back per input."""
        n = len(xs)
        values = self.shared.run_stream(self.stream_input, np.concatenate(xs, axis=0))
        per_item: list[dict[str, OutputValue]] = [{} for _ in range(n)]
        for name, value in zip(self.output_names, values, strict=True):
            if len(value) != n:
                raise ModelError(f"output {name} has {len(value)} rows for a batch of {n}")
            for i in range(n):
                per_item[i][name] = value[i : i + 1]
        if not self._warm:
            self._warmed(xs[0], f"1 run: the first {n} frames")
        return per_item

    def warmup(self, example: np.ndarray | None = None, runs: int = 2) -> float:
        """Run the model on an example (or zeros) so that the first real frame is not the slow one."""
        x = example if example is not None else self.stream_spec.example()
        started = time.perf_counter()
        state = self.new_state()
        self._warm = True  # these runs are the warm-up: no first-run bookkeeping inside them
        try:
            for _ in range(runs):
                self.run(x, state)
        except Exception as exc:  # ORT raises its own classes, not RuntimeError
            raise ModelError(f"model {self.name} {self.version} failed its warm-up run: {exc}") from exc
        ms = (time.perf_counter() - started) * 1000 / runs
        self._warmed(x, f"{runs} run{'s' if runs > 1 else ''}")
        return ms

    def _warmed(self, x: np.ndarray, how: str) -> None:
        """After the first run: the session's memory is settled, and whether batching pays is judged."""
        self._warm = True
        START.mark(f"model {self.name} warmed ({how})")
        self.shared.settle_memory()
        if self.shared.successor_pending:  # an interim session: its successor warms up on this input
            self.shared.first_run(
                self.stream_input, {self.stream_input: x, **self.constants, **self.new_state().values}
            )
        if self.batchable:
            self.shared.judge(self.stream_input, x)


def load_model(
    source: Path | bytes,
    runtime: RuntimeConfig,
    state_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    constants: Mapping[str, Constant] | None = None,
    state: Mapping[str, str] | None = None,
    stream_input: str | None = None,
    example: np.ndarray | None = None,
    warmup_runs: int = 2,
    emit: EventSink = log_event,
    optimization: Optimization | None = None,
    plan: StreamPlan | None = None,
    interim: bool = False,
) -> Model:
    """Lease the model's shared session (opened through agent.device.session on first use), check the
    signature against the pipeline, warm up. `plan`: how the pipeline feeds the stream input, written
    into the model where it can be (agent.device.graphprep); the version stays the file's. `interim`: a
    start, which may serve on the CPU provider while the provider chosen opens (`SessionPool.acquire`)."""
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            raise ModelError(f"model file {source} does not exist")
    path = source if isinstance(source, Path) else None
    name = name or (path.stem if path is not None else "model")
    digest = model_digest(source)  # once: the session pool keys on it too
    version = version or "sha256:" + digest[:12]  # nothing names it: results still tell two apart
    # The release table's limits are enough to let a model through; only a refusal is proven first (loading
    # probe models costs a start 20 ms), and a model the runtime then fails is explained the same way.
    if _refusal(source, name, runtime.custom_ops, proven=False) and (
        reason := _refusal(source, name, runtime.custom_ops, proven=True)
    ):
        raise ModelError(f"cannot load model {name} {version}: {reason}")
    rewritten = _rewrite(source, digest, plan, Path(state_dir), name) if plan is not None else None
    shared, rewritten = _lease(
        source, digest, rewritten, runtime, Path(state_dir), optimization, emit, name, version, interim
    )
    if rewritten is not None:
        stream_input = rewritten.input
        log.info("model input rewritten name=%s input=%s changes=%r", name, rewritten.input, rewritten.changes)
    frames = rewritten is not None and rewritten.frames
    model = Model(shared, name, version, constants, state, stream_input, takes_frames=frames)
    how = "shared session" if shared.users > 1 else f"optimised model cache: {shared.opened.cache}"
    START.mark(f"model {name} {version} on {model.provider} ({how})")
    if warmup_runs:
        try:
            ms = model.warmup(example, warmup_runs)
        except ModelError:
            model.close()
            raise
        log.info("model warmed name=%s version=%s provider=%s warm_ms=%.1f", name, version, model.provider, ms)
    return model


def _lease(
    source: Path | bytes,
    digest: str,
    rewritten: Rewritten | None,
    runtime: RuntimeConfig,
    state_dir: Path,
    optimization: Optimization | None,
    emit: EventSink,
    name: str,
    version: str,
    interim: bool,
) -> tuple[SharedSession, Rewritten | None]:
    """The pool's session for the rewritten model (from its file under the state folder), or for the model
    as it is when there is none or it does not load; the rewrite that was used."""
    label = f"{name} {version}"
    if rewritten is not None:
        if isinstance(rewritten.model, bytes):
            log.debug("model %s: the rewritten model is not kept on disk, so it loads from memory", label)
        try:
            return POOL.acquire(
                rewritten.model,
                runtime,
                state_dir,
                optimization=optimization,
                emit=emit,
                digest=rewritten.digest,
                interim=interim,
                label=name,
            ), rewritten
        except Exception as exc:  # noqa: BLE001 (the file as it is may still load: it is tried next)
            log.warning("model %s: its rewritten input does not load, so it runs as it is: %s", label, _last_line(exc))
    try:
        return POOL.acquire(
            source,
            runtime,
            state_dir,
            optimization=optimization,
            emit=emit,
            digest=digest,
            interim=interim,
            label=name,
        ), None
    except Exception as exc:  # ORT's Fail/InvalidGraph derive from Exception
        reason = _refusal(source, name, runtime.custom_ops, proven=True) or _last_line(exc)
        raise ModelError(f"cannot load model {label}: {reason}") from exc


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else exc.__class__.__name__


def _rewrite(source: Path | bytes, digest: str, plan: StreamPlan, state_dir: Path, name: str) -> Rewritten | None:
    """The model with its stream input as the pipeline feeds it, or None where it stays as it is."""
    try:
        return graphprep.kept(state_dir, source, digest, plan)
    except (graphprep.NotRewritableError, WireError, OSError) as exc:
        log.debug("model %s input kept as it is: %s", name, exc)
        return None


def _refusal(source: Path | bytes, name: str, libraries: Sequence[LocalLibrary], *, proven: bool) -> str | None:
    """The opset/IR reason this runtime cannot load the model (onnxruntime's own message is cut off), by
    the release table or `proven` by loading probe models; custom domains count as registered where the
    model's or the profile's custom-op libraries provide them."""
    try:
        header = compat.read_header(source)
    except Exception:  # noqa: BLE001 (not an ONNX protobuf, e.g. an .ort file: let the runtime judge)
        return None
    caps = customops.loadable_caps(_runtime_caps() if proven else _table_caps(), source, libraries)
    return compat.refusal(caps, name, header.ir_version, header.opsets)


@functools.lru_cache(maxsize=1)
def _runtime_caps() -> compat.RuntimeCaps:
    return compat.installed_caps()


@functools.lru_cache(maxsize=1)
def _table_caps() -> compat.RuntimeCaps:
    import onnxruntime as ort

    return compat.caps_for(ort.__version__)
