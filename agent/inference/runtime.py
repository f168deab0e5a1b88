"""A loaded model: its session (always built through `agent.providers.open_session`), its input and
output signature, warm-up, and runs with constant inputs and recurrent state.

The pipeline owns one `Model` at a time and a `ModelState` beside it; a hot swap loads and warms a
second `Model` while the first keeps serving, then the pipeline replaces both between two frames.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.profile import RuntimeConfig
from agent.device.providers import open_session
from agent.inference.processing.pre import NUMPY_TYPES
from agent.transport.events import Event, EventSink, log_event

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
    def is_tensor(self) -> bool:
        return self.type.startswith("tensor(")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(NUMPY_TYPES.get(self.type, "float32"))

    def example(self, spatial: tuple[int, int] | None = None) -> np.ndarray:
        """Zeros of this shape, dynamic batch and other dims 1, dynamic image dims `spatial` (h, w)."""
        dims = list(self.shape or ())
        out = []
        for i, d in enumerate(dims):
            if d is not None:
                out.append(d)
            elif len(dims) == 4 and i >= 2:
                out.append((spatial or (WARMUP_SPATIAL, WARMUP_SPATIAL))[i - 2])
            else:
                out.append(1)
        return np.zeros(out, dtype=self.dtype)


def _spec(arg: Any) -> TensorSpec:
    shape = arg.shape
    if isinstance(shape, list):
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
    else:
        shape = None
    return TensorSpec(arg.name, shape, arg.type)


def file_version(path: Path) -> str:
    """A file model's version: the start of its sha256, so results tell two files apart."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:12]


def constant_tensor(spec: TensorSpec, value: Any) -> np.ndarray:
    """A profile constant (`inputs: {sr: 16000}`) shaped and typed as the model input wants it."""
    arr = np.asarray(value, dtype=spec.dtype)
    shape = spec.shape or ()
    if arr.ndim == len(shape):
        return arr
    if all(d is not None for d in shape) and int(np.prod(shape)) == arr.size:
        return arr.reshape(shape)
    while arr.ndim < len(shape):
        arr = arr[None]
    return arr


@dataclass
class ModelState:
    """Recurrent inputs carried from one step to the next (input name -> tensor)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)


class Model:
    """A session ready to serve one pipeline's stream input, constants and state."""

    def __init__(
        self,
        session: Any,
        provider: str,
        name: str,
        version: str,
        constants: Mapping[str, Any] | None = None,
        state: Mapping[str, str] | None = None,
        stream_input: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.session = session
        self.provider = provider
        self.name = name
        self.version = version
        self.path = path
        self.inputs = {a.name: _spec(a) for a in session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in session.get_outputs()}
        self.output_names = list(self.outputs)
        state = dict(state or {})
        constants = dict(constants or {})
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
        self.batchable = (
            not state
            and not self.constants
            and bool(self.stream_spec.shape)
            and self.stream_spec.shape[0] is None
            and all(
                (o.shape is not None and len(o.shape) > 0 and o.shape[0] is None) or o.type.startswith("seq(")
                for o in self.outputs.values()
            )
        )

    def new_state(self) -> ModelState:
        return ModelState({k: self.inputs[k].example() for k in self.state_map})

    def run(self, x: np.ndarray, state: ModelState | None = None) -> dict[str, Any]:
        feeds = {self.stream_input: x}
        if self.constants:
            feeds.update(self.constants)
        if self.state_map:
            assert state is not None, "a model with state needs a ModelState"
            feeds.update(state.values)
        values = self.session.run(None, feeds)
        out = dict(zip(self.output_names, values))
        if self.state_map:
            assert state is not None
            state.values = {k: out[v] for k, v in self.state_map.items()}
        return out

    def run_batch(self, xs: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Several stream inputs (each with a batch dimension of 1) in one run, split back per input."""
        n = len(xs)
        values = self.session.run(None, {self.stream_input: np.concatenate(xs, axis=0)})
        per_item: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, value in zip(self.output_names, values):
            if len(value) != n:
                raise ModelError(f"output {name} has {len(value)} rows for a batch of {n}")
            for i in range(n):
                per_item[i][name] = value[i : i + 1]
        return per_item

    def warmup(self, example: np.ndarray | None = None, runs: int = 2) -> float:
        """Run the model on an example (or zeros) so that the first real frame is not the slow one."""
        x = example if example is not None else self.stream_spec.example()
        started = time.perf_counter()
        state = self.new_state()
        try:
            for _ in range(runs):
                self.run(x, state)
        except Exception as exc:  # ORT raises its own classes, not RuntimeError
            raise ModelError(f"model {self.name} {self.version} failed its warm-up run: {exc}") from exc
        return (time.perf_counter() - started) * 1000 / runs

    def warmup_if_possible(self) -> None:
        """Warm with zeros when no real input shape is known; a model whose dynamic dimensions reject
        the guess is warmed by its first frame instead (and checked there)."""
        try:
            self.warmup(None, runs=1)
        except ModelError as exc:
            log.debug("warm-up deferred to the first frame name=%s reason=%s", self.name, exc)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "provider": self.provider,
            "inputs": {k: [d if d is not None else "?" for d in (v.shape or ())] for k, v in self.inputs.items()},
        }


def load_model(
    source: Path | bytes,
    runtime: RuntimeConfig,
    state_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    constants: Mapping[str, Any] | None = None,
    state: Mapping[str, str] | None = None,
    stream_input: str | None = None,
    example: np.ndarray | None = None,
    warmup_runs: int = 2,
    emit: EventSink = log_event,
) -> Model:
    """Build the session through the providers module, check the signature against the pipeline, warm up."""
    path = Path(source) if not isinstance(source, bytes) else None
    if path is not None and not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    name = name or (path.stem if path is not None else "model")
    version = version or (
        file_version(path) if path is not None else "sha256:" + hashlib.sha256(source).hexdigest()[:12]
    )  # type: ignore[arg-type]
    _check_loadable(source, name, version)
    try:
        opened = open_session(source if isinstance(source, bytes) else path, runtime, state_dir, emit)  # type: ignore[arg-type]
    except Exception as exc:  # ORT's Fail/InvalidGraph derive from Exception
        raise ModelError(
            f"cannot load model {name} {version}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        ) from exc
    model = Model(opened.session, opened.provider, name, version, constants, state, stream_input, path)
    if warmup_runs:
        ms = model.warmup(example, warmup_runs)
        log.info("model warmed name=%s version=%s provider=%s warm_ms=%.1f", name, version, model.provider, ms)
    return model


def _check_loadable(source: Path | bytes, name: str, version: str) -> None:
    """Refuse with the opset/IR reason before ONNX Runtime fails with its own cut-off message."""
    from agent.device import compat

    try:
        header = compat.read_header(source)
    except Exception:  # noqa: BLE001 (not an ONNX protobuf, e.g. an .ort file: let the runtime judge)
        return
    reason = compat.refusal(_runtime_caps(), name, header.ir_version, header.opsets)
    if reason:
        raise ModelError(f"cannot load model {name} {version}: {reason}")


@functools.lru_cache(maxsize=1)
def _runtime_caps() -> Any:
    from agent.device import compat

    return compat.installed_caps()


def to_json(value: Any, digits: int | None = 6) -> Any:
    """Model outputs as plain JSON: tensors as nested lists, ZipMap sequences of maps as objects."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            out = np.round(value.astype(np.float64), digits) if digits is not None else value
            if not np.isfinite(out).all():  # NaN and infinity are not JSON: null, as JSON.stringify does
                return np.where(np.isfinite(out), out, None).tolist()
            return out.tolist()
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, digits) for v in value]
    if isinstance(value, (np.floating, float)):
        if not np.isfinite(value):
            return None
        return round(float(value), digits) if digits is not None else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


__all__ = ["Event", "Model", "ModelError", "ModelState", "TensorSpec", "load_model", "to_json", "file_version"]
