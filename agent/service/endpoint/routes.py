"""The KServe v2 routes: health, server and model metadata, readiness, and inference.

A model is looked up by name on every request among the models the pipelines serve right now, so a hot
swap shows at the next request and the endpoint never holds a session of its own: it runs the
pipelines' shared session (agent.inference.sessions), which keeps the one copy of the weights.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.config.endpoint import EndpointConfig
from agent.service.endpoint.stats import UNKNOWN_MODEL, EndpointStats
from agent.service.endpoint.tensors import (
    InputSpec,
    OutputRequest,
    RequestError,
    decode_request,
    encode_response,
    kserve_type,
    parse_json,
    shown,
)

if TYPE_CHECKING:
    from agent.inference.runtime import Model, TensorSpec

# (HTTP status, body, Inference-Header-Content-Length when binary data follows the JSON)
Answer = tuple[int, bytes, int | None]
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data"]


def _json(code: int, doc: Any) -> Answer:
    return code, json.dumps(doc, separators=(",", ":")).encode(), None


def _shape(spec: TensorSpec) -> list[int]:
    return [-1 if d is None else d for d in spec.shape or ()]


def input_specs(model: Model) -> dict[str, InputSpec]:
    return {
        name: InputSpec(name, kserve_type(spec.type), spec.shape, optional=name in model.constants)
        for name, spec in model.inputs.items()
    }


class Routes:
    """What each route answers; `models()` is the daemon's map of served model name -> current Model."""

    def __init__(
        self,
        config: EndpointConfig,
        models: Callable[[], Mapping[str, Model]],
        ready: Callable[[], str | None],
        stats: EndpointStats,
        version: str,
    ) -> None:
        self.config = config
        self.models = models
        self.ready = ready
        self.stats = stats
        self.version = version
        self._slots = threading.BoundedSemaphore(config.concurrency)

    def answer(self, method: str, path: str, body: bytes, header_length: str | None, started: float) -> Answer:
        parts = path.rstrip("/").split("/")[1:]
        if parts[:1] != ["v2"]:
            raise RequestError(404, f"not a KServe v2 route: {shown(path)} (routes start with /v2)")
        rest = parts[1:]
        if rest[:1] == ["models"] and len(rest) >= 2:
            return self._model_route(method, rest[1], rest[2:], body, header_length, started)
        if method != "GET":
            raise RequestError(405, f"{method} is not allowed on {shown(path)} (GET is)")
        if rest == []:
            return _json(200, {"name": "edge-agent", "version": self.version, "extensions": EXTENSIONS})
        if rest == ["health", "live"]:
            return _json(200, {"live": True})
        if rest == ["health", "ready"]:
            reason = self.ready()
            if reason is not None:
                return _json(503, {"ready": False, "error": reason})
            return _json(200, {"ready": True})
        raise RequestError(404, f"no such route: {shown(path)}")

    def _model_route(
        self, method: str, name: str, rest: list[str], body: bytes, header_length: str | None, started: float
    ) -> Answer:
        model = self.models().get(name)
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else None
        if len(rest) > 1 or action not in (None, "infer", "ready"):
            raise RequestError(404, f"no such route for model {shown(name)}: {shown('/'.join(rest))}")
        if action == "infer":
            if method != "POST":
                raise RequestError(405, "inference is a POST")
            return self._infer(name, model, version, body, header_length, started)
        if method != "GET":
            raise RequestError(405, f"{method} is not allowed here (GET is)")
        model = self._found(name, model, version)
        if action == "ready":
            return _json(200, {"name": model.name, "version": model.version, "ready": True})
        return _json(200, self._metadata(model))

    def _found(self, name: str, model: Model | None, version: str | None) -> Model:
        if model is None:
            served = ", ".join(sorted(self.models())) or "none"
            raise RequestError(404, f"unknown model {shown(name)} (served here: {served})")
        if version is not None and version != model.version:
            raise RequestError(404, f"model {name!r} serves version {model.version}, not {shown(version)}")
        return model

    def _metadata(self, model: Model) -> dict[str, Any]:
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": PLATFORM,
            "inputs": [
                {"name": n, "datatype": kserve_type(s.type), "shape": _shape(s)}
                for n, s in model.inputs.items()
                if n not in model.constants
            ],
            "outputs": [
                {"name": n, "datatype": kserve_type(s.type), "shape": _shape(s)} for n, s in model.outputs.items()
            ],
        }

    def _infer(
        self,
        name: str,
        model: Model | None,
        version: str | None,
        body: bytes,
        header_length: str | None,
        started: float,
    ) -> Answer:
        label = name if model is not None else UNKNOWN_MODEL
        try:
            answer = self._run(self._found(name, model, version), body, header_length, started)
        except RequestError as exc:
            self.stats.record(label, exc.status, None)
            raise
        except Exception:
            self.stats.record(label, 500, None)
            raise
        self.stats.record(label, 200, (time.monotonic() - started) * 1000)
        return answer

    def _run(self, model: Model, body: bytes, header_length: str | None, started: float) -> Answer:
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise RequestError(
                    400, f"Inference-Header-Content-Length {shown(header_length)} is not a length within the body"
                )
            split = int(header_length)
        else:
            split = len(body)
        header = parse_json(body[:split], "the request")
        request = decode_request(header, body[split:], input_specs(model), self.config.max_elements)
        names = model.output_names
        wanted = request.outputs
        if wanted is not None:
            unknown = [o.name for o in wanted if o.name not in model.outputs]
            if unknown:
                raise RequestError(400, f"the model has no output {shown(unknown[0])} (outputs: {', '.join(names)})")
        feeds = {**{k: v for k, v in model.constants.items() if k not in request.inputs}, **request.inputs}
        left = started + self.config.deadline - time.monotonic()
        if left <= 0 or not self._slots.acquire(timeout=left):
            raise RequestError(503, "the endpoint is busy: no inference slot came free within its deadline")
        try:
            values = model.shared.run(feeds)
        except Exception as exc:  # noqa: BLE001 (ORT's own errors: the input did not suit the model)
            raise RequestError(400, f"the model refused the input: {str(exc).strip().splitlines()[-1][:300]}") from None
        finally:
            self._slots.release()
        out = dict(zip(names, values, strict=True))
        chosen = wanted if wanted is not None else [OutputRequest(n, request.binary_default) for n in names]
        return 200, *encode_response(
            model.name, model.version, request.id, [(o.name, out[o.name], o.binary) for o in chosen]
        )
