"""The local status page: `/healthz` for probes, `/metrics` for Prometheus, `/api/status` as JSON,
`/frame/<pipeline>.jpg` with the latest boxes drawn, and `/` (one self-contained HTML page).

Like health, it knows none of the agent's parts: the daemon hands in three callables,

    server = StatusServer(profile.runtime.http, snapshot=status_snapshot, frame=latest_frame, alive=why_unhealthy)
    server.start()      # raises StatusPageError when the address cannot be bound
    ...
    server.stop()

- `snapshot()` -> the status document: {"device", "uptime_s", "agent_version", "connection": {"state", ...}
  or None, "outbox": OutboxStats.as_dict() or None, "pipelines": [Pipeline.stats(), ...]} (a mapping of
  name -> stats is accepted too).
- `frame(pipeline)` -> (image, boxes) or None: image is JPEG bytes or a BGR uint8 array (encoded here,
  only when someone looks), boxes are result boxes ({"box": [x1, y1, x2, y2], "score", "label"}).
- `alive()` -> None when healthy, otherwise the reason /healthz answers 503 with.

A failing callable or a bad request is an HTTP error for that request and a debug log line; it never
reaches the daemon. No authentication: bind to loopback unless a proxy in front adds it.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[str, Any]]
FrameGetter = Callable[[str], "tuple[bytes | np.ndarray, Sequence[Any]] | None"]
Alive = Callable[[], "str | None"]

MAX_CLIENTS = 16  # concurrent requests; a status page on a small device must not become its load
CLIENT_TIMEOUT_S = 10.0  # a client that stops reading or writing gives its thread back after this
JPEG_QUALITY = 80
STOP_POLL_S = 0.2  # how soon stop() returns; the idle wake-ups this costs are negligible
BOX_COLOR = (0, 200, 255)  # BGR amber: visible on both dark and light scenes


class StatusPageError(RuntimeError):
    """The status page could not start (address taken, not an address of this machine, ...)."""


def parse_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8790' or '[::1]:8790' -> (host, port); port 0 asks the system for a free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StatusPageError(f"expected host:port such as 127.0.0.1:8790, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class StatusServer:
    """The status page's HTTP server on its own threads, started and stopped by the daemon."""

    def __init__(self, address: str, snapshot: Snapshot, frame: FrameGetter, alive: Alive) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.snapshot = snapshot
        self.frame = frame
        self.alive = alive
        self._frames = _FrameCache()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> StatusServer:
        if self._server is not None:
            return self
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family = infos[0][0]
        except socket.gaierror as exc:
            raise StatusPageError(f"status page: cannot resolve {self.host!r}: {exc.strerror}") from None
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            self._server = server_class((self.host, self.port), _Handler)
        except OSError as exc:
            raise StatusPageError(f"status page: cannot listen on {self.address}: {exc.strerror or exc}") from None
        self._server.status = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": STOP_POLL_S}, name="statuspage", daemon=True
        )
        self._thread.start()
        log.info("status page on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what each endpoint answers (status, content type, body) -----------------------------------

    def healthz(self) -> tuple[int, str, bytes]:
        try:
            reason = self.alive()
        except Exception as exc:  # noqa: BLE001 (a broken check is unhealthy, not a crash)
            reason = f"health check failed: {exc.__class__.__name__}: {exc}"
        if reason is None:
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 503, "text/plain; charset=utf-8", f"{reason}\n".encode()

    def status(self) -> dict[str, Any]:
        doc = dict(self.snapshot())
        doc["pipelines"] = pipelines_of(doc)
        return doc

    def metrics(self) -> str:
        return render_metrics(self.status())

    def frame_jpeg(self, pipeline: str) -> bytes | None:
        got = self.frame(pipeline)
        if got is None:
            return None
        image, boxes = got
        return self._frames.render(pipeline, image, boxes)


def pipelines_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The snapshot's pipelines as a list of stats, each naming its pipeline."""
    raw = doc.get("pipelines") or []
    if isinstance(raw, dict):
        return [{**stats, "pipeline": stats.get("pipeline", name)} for name, stats in raw.items()]
    return [dict(stats) for stats in raw]


# -- frames ---------------------------------------------------------------------------------------


class _FrameCache:
    """The last rendered JPEG per pipeline: a page polling every second re-encodes only new frames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, Any, bytes]] = {}

    def render(self, pipeline: str, image: bytes | np.ndarray, boxes: Sequence[Any]) -> bytes:
        boxes = list(boxes or [])
        with self._lock:
            hit = self._last.get(pipeline)
            if hit is not None and hit[0] is image and hit[1] == boxes:
                return hit[2]
        jpeg = draw_boxes(image, boxes)
        with self._lock:
            # The image itself is kept as the key: identity stays meaningful while it is alive.
            self._last[pipeline] = (image, boxes, jpeg)
        return jpeg


def draw_boxes(image: bytes | np.ndarray, boxes: Iterable[Any]) -> bytes:
    """A JPEG of the image with each box ([x1, y1, x2, y2] in source pixels) and its label drawn."""
    import cv2  # the page may run where nothing else needs OpenCV loaded yet

    boxes = list(boxes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not boxes:
            return bytes(image)
        picture = cv2.imdecode(np.frombuffer(image, dtype=np.uint8), cv2.IMREAD_COLOR)
        if picture is None:
            raise ValueError("the latest frame is not a decodable JPEG")
    else:
        picture = np.asarray(image)
        if picture.ndim == 2:
            picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
        elif picture.ndim != 3 or picture.shape[2] not in (3, 4):
            raise ValueError(f"the latest frame has shape {picture.shape}, not an image")
        # A copy: the boxes must not be drawn into the frame the pipeline still holds.
        picture = np.array(picture[:, :, :3], dtype=np.uint8, copy=True)
    thickness = max(1, round(max(picture.shape[:2]) / 400))
    for item in boxes:
        box, caption = _box_and_caption(item)
        if box is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(picture, (x1, y1), (x2, y2), BOX_COLOR, thickness)
        if caption:
            cv2.putText(
                picture,
                caption,
                (x1, max(12, y1 - 4)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness,
                BOX_COLOR,
                thickness,
                cv2.LINE_AA,
            )
    ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("the latest frame could not be encoded as JPEG")
    return buf.tobytes()


def _box_and_caption(item: Any) -> tuple[list[float] | None, str]:
    if isinstance(item, dict):
        box, parts = item.get("box"), []
        label = item.get("label", item.get("class"))
        if label is not None:
            parts.append(str(label))
        if isinstance(item.get("score"), (int, float)):
            parts.append(f"{item['score']:.2f}")
        caption = " ".join(parts)
    else:
        box, caption = item, ""
    try:
        values = [float(v) for v in box]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None, ""
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None, ""
    return values, caption


# -- Prometheus text exposition (version 0.0.4) ---------------------------------------------------

# (metric, type, help, key in Pipeline.stats()); the pipeline label is added to each.
PIPELINE_COUNTERS = (
    ("edge_agent_pipeline_frames_total", "frames the source delivered", "frames"),
    ("edge_agent_pipeline_dropped_frames_total", "camera frames replaced by a newer one before inference", "dropped"),
    ("edge_agent_pipeline_skipped_frames_total", "frames skipped to keep the pipeline's rate", "skipped"),
    ("edge_agent_pipeline_rejected_frames_total", "frames the preprocessor could not use", "rejected"),
    ("edge_agent_pipeline_inferences_total", "inferences run", "inferences"),
    ("edge_agent_pipeline_results_total", "results handed to the outbox", "results"),
    ("edge_agent_pipeline_model_swaps_total", "model versions swapped in while running", "swaps"),
)
PIPELINE_ERRORS = {
    "inference": "inference_errors",
    "post": "post_errors",
    "sink": "sink_errors",
    "source": "source_errors",
}
OUTBOX_GAUGES = (
    ("edge_agent_outbox_messages", "messages waiting in the outbox for the broker's acknowledgement", "depth"),
    ("edge_agent_outbox_bytes", "disk the outbox uses", "bytes"),
    ("edge_agent_outbox_max_bytes", "disk the outbox may use", "max_bytes"),
    ("edge_agent_outbox_oldest_age_seconds", "age of the oldest message waiting", "oldest_age_s"),
)
OUTBOX_COUNTERS = (
    ("edge_agent_outbox_dropped_total", "messages dropped because the outbox was full or they were too old", "dropped"),
    ("edge_agent_outbox_acked_total", "messages the broker acknowledged", "acked"),
)
CONNECTED_STATES = frozenset({"online", "connected"})


class _Exposition:
    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: Any, /, **labels: Any) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        number = _number(value)
        if number is None:
            return
        label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items() if v is not None)
        family[2].append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def render_metrics(doc: dict[str, Any]) -> str:
    """The status document as Prometheus text: every family with # HELP and # TYPE, labels escaped."""
    out = _Exposition()
    out.add(
        "edge_agent_info",
        "gauge",
        "the agent: device id and agent version",
        1,
        device=doc.get("device"),
        version=doc.get("agent_version"),
    )
    out.add("edge_agent_uptime_seconds", "gauge", "seconds since the agent started", doc.get("uptime_s"))
    connection = doc.get("connection")
    if isinstance(connection, dict):
        up = connection.get("connected", connection.get("state") in CONNECTED_STATES)
        out.add(
            "edge_agent_mqtt_connected",
            "gauge",
            "1 while the broker connection is up",
            bool(up),
            state=connection.get("state"),
        )
        out.add(
            "edge_agent_mqtt_connects_total",
            "counter",
            "successful connections to the broker",
            connection.get("connects"),
        )
    outbox = doc.get("outbox")
    if isinstance(outbox, dict):
        for name, help_text, key in OUTBOX_GAUGES:
            out.add(name, "gauge", help_text, outbox.get(key))
        for name, help_text, key in OUTBOX_COUNTERS:
            out.add(name, "counter", help_text, outbox.get(key))
    for stats in doc.get("pipelines") or []:
        pipeline = stats.get("pipeline")
        fps = stats.get("fps", stats.get("results_per_s"))
        out.add(
            "edge_agent_pipeline_fps", "gauge", "results per second over the last few seconds", fps, pipeline=pipeline
        )
        out.add(
            "edge_agent_pipeline_up",
            "gauge",
            "1 while the pipeline is running",
            stats.get("state") == "running",
            pipeline=pipeline,
            state=stats.get("state"),
        )
        for stage, values in sorted((stats.get("latency_ms") or {}).items()):
            for quantile, key in (("0.5", "p50"), ("0.95", "p95")):
                ms = (values or {}).get(key)
                out.add(
                    "edge_agent_pipeline_latency_seconds",
                    "gauge",
                    "recent latency per stage (pre, infer, post, total)",
                    None if ms is None else round(float(ms) / 1000.0, 7),
                    pipeline=pipeline,
                    stage=stage,
                    quantile=quantile,
                )
        for name, help_text, key in PIPELINE_COUNTERS:
            out.add(name, "counter", help_text, stats.get(key), pipeline=pipeline)
        for kind, key in PIPELINE_ERRORS.items():
            out.add(
                "edge_agent_pipeline_errors_total",
                "counter",
                "errors per stage",
                stats.get(key),
                pipeline=pipeline,
                kind=kind,
            )
        out.add(
            "edge_agent_model_info",
            "gauge",
            "the model each pipeline serves: name, version and execution provider",
            1,
            pipeline=pipeline,
            model=stats.get("model"),
            version=stats.get("model_version"),
            provider=stats.get("provider"),
        )
    return out.text()


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them and browsers reject the document."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- HTTP -----------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    status: StatusServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("status page: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "edge-agent"

    def do_GET(self) -> None:  # http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        status = self.server.status
        path = urlsplit(self.path).path
        try:
            if path == "/healthz":
                code, kind, data = status.healthz()
            elif path == "/metrics":
                code, kind, data = 200, "text/plain; version=0.0.4; charset=utf-8", status.metrics().encode()
            elif path == "/api/status":
                code, kind = 200, "application/json"
                data = json.dumps(_finite(status.status()), default=str, allow_nan=False).encode()
            elif path == "/" or path == "/index.html":
                code, kind, data = 200, "text/html; charset=utf-8", PAGE.encode()
            elif path.startswith("/frame/") and path.endswith(".jpg"):
                name = unquote(path[len("/frame/") : -len(".jpg")])
                jpeg = status.frame_jpeg(name)
                if jpeg is None:
                    code, kind, data = 404, "text/plain; charset=utf-8", f"no frame for pipeline {name!r}\n".encode()
                else:
                    code, kind, data = 200, "image/jpeg", jpeg
            else:
                code, kind, data = 404, "text/plain; charset=utf-8", f"not found: {path}\n".encode()
        except Exception as exc:  # one failed request must not reach the daemon
            log.debug("status page: %s failed", path, exc_info=True)
            code, kind, data = 500, "text/plain; charset=utf-8", f"{exc.__class__.__name__}: {exc}\n".encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)
        except OSError:
            log.debug("status page: client went away during %s", path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("status page: %s %s", self.address_string(), format % args)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edge-agent</title>
<style>
  :root { --bg: #101418; --card: #1a2027; --fg: #e6e9ec; --dim: #8b96a1; --ok: #3fb950; --bad: #f85149; --line: #2b333c; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--fg); }
  header { display: flex; flex-wrap: wrap; gap: 6px 24px; align-items: baseline; padding: 12px 20px; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0 12px 0 0; }
  .dim { color: var(--dim); }
  .ok { color: var(--ok); } .bad { color: var(--bad); }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); align-items: start; gap: 16px; padding: 16px 20px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
  .card h2 { font-size: 16px; margin: 0 0 4px; display: flex; justify-content: space-between; }
  .model { font-family: ui-monospace, monospace; font-size: 12px; color: var(--dim); margin-bottom: 8px; word-break: break-all; }
  .frame { width: 100%; aspect-ratio: 4 / 3; background: #000; border-radius: 4px; display: flex; align-items: center; justify-content: center; overflow: hidden; }
  .frame img { width: 100%; height: 100%; object-fit: contain; display: none; }
  .frame.none { aspect-ratio: auto; height: 36px; background: transparent; border: 1px dashed var(--line); }
  .frame img[data-loaded="1"] { display: block; }
  .nums { display: flex; gap: 18px; margin: 8px 0; flex-wrap: wrap; }
  .nums b { font-size: 20px; font-variant-numeric: tabular-nums; }
  canvas { width: 100%; height: 110px; display: block; margin-top: 6px; background: #12171c; border-radius: 4px; }
  #error { padding: 8px 20px; color: var(--bad); }
</style>
</head>
<body data-polls="0">
<header>
  <h1>edge-agent</h1>
  <span>device <b id="device">&hellip;</b></span>
  <span>up <b id="uptime">&hellip;</b></span>
  <span>broker <b id="connection">&hellip;</b></span>
  <span>outbox <b id="outbox">&hellip;</b></span>
  <span class="dim" id="agent-version"></span>
</header>
<div id="error" hidden></div>
<main id="pipelines"></main>
<script>
"use strict";
const HISTORY = 120, STAGES = ["pre", "infer", "post", "total"];
const COLORS = {fps: "#58a6ff", pre: "#d2a8ff", infer: "#f0883e", post: "#3fb950", total: "#e6e9ec"};
const cards = new Map();
let polls = 0;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

function fmt(v, digits) { return (v === null || v === undefined) ? "-" : Number(v).toFixed(digits); }

function card(name) {
  if (cards.has(name)) return cards.get(name);
  const root = el("section", {class: "card", "data-pipeline": name});
  const title = el("h2");
  title.append(el("span", {}, name), el("span", {class: "state dim"}));
  const model = el("div", {class: "model"});
  const frame = el("div", {class: "frame"});
  const img = el("img", {alt: `latest frame of ${name}`, "data-loaded": "0"});
  const noFrame = el("span", {class: "dim"}, "no frame");
  frame.append(img, noFrame);
  const nums = el("div", {class: "nums"});
  const fps = el("b", {class: "fps", "data-fps": ""}, "-");
  const lat = el("b", {class: "latency"}, "-");
  const drops = el("b", {class: "dropped"}, "-");
  const f1 = el("span"); f1.append("fps ", fps);
  const f2 = el("span"); f2.append("latency p50/p95 ", lat, " ms");
  const f3 = el("span"); f3.append("dropped ", drops);
  nums.append(f1, f2, f3);
  const fpsChart = el("canvas", {class: "fps-chart", "data-points": "0"});
  const latChart = el("canvas", {class: "latency-chart", "data-points": "0"});
  root.append(title, model, frame, nums, fpsChart, latChart);
  document.getElementById("pipelines").append(root);
  const c = {root, state: title.lastChild, model, img, noFrame, fps, lat, drops, fpsChart, latChart,
             frame, history: [], loading: false, frameN: 0, retryAt: 0};
  img.addEventListener("load", () => {
    c.loading = false;
    if (img.naturalWidth > 0) {
      img.dataset.loaded = "1"; img.dataset.naturalWidth = String(img.naturalWidth);
      noFrame.hidden = true; frame.classList.remove("none");
    }
  });
  // No frame (a sensor pipeline, or none captured yet): a thin strip, asked for again now and then.
  img.addEventListener("error", () => {
    c.loading = false; img.dataset.loaded = "0"; noFrame.hidden = false; frame.classList.add("none");
    c.retryAt = polls + 10;
  });
  cards.set(name, c);
  return c;
}

function chart(canvas, series, unit) {
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 110, ratio = window.devicePixelRatio || 1;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  let max = 0, points = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.15 : 1;
  g.strokeStyle = "#2b333c"; g.lineWidth = 1;
  for (let i = 1; i < 4; i++) { g.beginPath(); g.moveTo(0, h * i / 4); g.lineTo(w, h * i / 4); g.stroke(); }
  g.font = "11px system-ui, sans-serif";
  let legendX = 6;
  for (const s of series) {
    g.strokeStyle = s.color; g.lineWidth = 1.5; g.setLineDash(s.dash || []);
    g.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (v === null) { started = false; return; }
      const x = i * (w / (HISTORY - 1)), y = h - 4 - (v / max) * (h - 18);
      if (started) g.lineTo(x, y); else g.moveTo(x, y);
      started = true; points++;
    });
    g.stroke(); g.setLineDash([]);
    g.fillStyle = s.color; g.fillText(s.label, legendX, 12); legendX += g.measureText(s.label).width + 12;
  }
  g.fillStyle = "#8b96a1"; g.textAlign = "right"; g.fillText(`${max.toFixed(1)} ${unit}`, w - 4, 12); g.textAlign = "left";
  canvas.dataset.points = String(points);
}

function show(doc) {
  document.getElementById("device").textContent = doc.device || "-";
  document.getElementById("uptime").textContent = duration(doc.uptime_s);
  document.getElementById("agent-version").textContent = doc.agent_version ? `edge-agent ${doc.agent_version}` : "";
  const conn = document.getElementById("connection");
  if (doc.connection) {
    conn.textContent = doc.connection.state || "-";
    conn.className = ["online", "connected"].includes(doc.connection.state) ? "ok" : "bad";
  } else { conn.textContent = "none (stdout)"; conn.className = "dim"; }
  const ob = doc.outbox;
  document.getElementById("outbox").textContent = ob ? `${ob.depth} waiting, ${ob.dropped || 0} dropped` : "-";
  const seen = new Set();
  for (const p of doc.pipelines || []) {
    const name = String(p.pipeline); seen.add(name);
    const c = card(name);
    c.state.textContent = p.state || "";
    c.state.className = "state " + (p.state === "running" ? "ok" : "bad");
    c.model.textContent = `${p.model || "?"} ${p.model_version || ""} on ${p.provider || "?"}`;
    c.model.dataset.version = p.model_version || ""; c.model.dataset.provider = p.provider || "";
    const fps = p.fps !== undefined ? p.fps : p.results_per_s;
    c.fps.textContent = fmt(fps, 1); c.fps.dataset.fps = fps === null || fps === undefined ? "" : String(fps);
    const lat = p.latency_ms || {}, total = lat.total || lat.infer || {};
    c.lat.textContent = `${fmt(total.p50, 1)}/${fmt(total.p95, 1)}`;
    c.drops.textContent = String(p.dropped || 0);
    c.history.push({fps: fps === undefined ? null : fps, lat});
    if (c.history.length > HISTORY) c.history.shift();
    chart(c.fpsChart, [{label: "fps", color: COLORS.fps, values: c.history.map(x => x.fps)}], "fps");
    chart(c.latChart, STAGES.filter(s => s in lat).map(s => ({
      label: `${s} p50`, color: COLORS[s], values: c.history.map(x => (x.lat[s] || {}).p50 ?? null)}))
      .concat("total" in lat ? [{label: "total p95", color: COLORS.total, dash: [4, 3],
        values: c.history.map(x => (x.lat.total || {}).p95 ?? null)}] : []), "ms");
    if (!c.loading && polls >= c.retryAt) {
      c.loading = true;
      c.img.src = `frame/${encodeURIComponent(name)}.jpg?n=${++c.frameN}`;
    }
  }
  for (const [name, c] of cards) if (!seen.has(name)) { c.root.remove(); cards.delete(name); }
}

async function poll() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("api/status", {cache: "no-store"});
    if (!response.ok) throw new Error(`status ${response.status}`);
    show(await response.json());
    error.hidden = true;
  } catch (e) {
    error.textContent = `cannot reach the agent: ${e.message}`; error.hidden = false;
  }
  document.body.dataset.polls = String(++polls);
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""
