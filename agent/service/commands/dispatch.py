"""Remote commands: `<prefix>/<device>/cmd/<name>` in, a JSON reply out, never a crash.

A registry keyed by command name: the daemon registers a handler per command; the argument spec of each
known command lives here, so that a wrong argument is refused with the same wording whoever handles it.

Request payload: a JSON object of arguments (empty payload = no arguments). Optional `"id"`: echoed in
the reply, for MQTT 3.1.1 clients that have no correlation data.

Reply, on the request's MQTT 5 response topic if it named one (its correlation data echoed), else on
`<prefix>/<device>/cmd/<name>/reply`:

    {"device": "gate-cam-01", "command": "ping", "id": "42", "ok": true, "ts": "...", "result": {...}}
    {"device": "gate-cam-01", "command": "rollback", "ok": false, "ts": "...",
     "error": {"code": "bad_argument", "message": "model: required (a string)"}}

Error codes: `bad_json`, `bad_argument`, `unknown_command`, `not_available` (known, but this daemon has
no handler for it), `failed` (the handler raised). Handlers run one at a time on the dispatcher's own
thread, never on the network thread; a handler registered as `background` (one that waits on the
network, like `update`) runs on a thread of its own, one request at a time, so that `ping`, `config` and
`rollback` are answered while it waits. A payload is bounded (agent.util.jsonlimits: MAX_PAYLOAD_BYTES,
nesting) before it is parsed, and a name argument is checked against agent.util.names before a handler
sees it.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.transport.connection import Connection, reply_properties
from agent.transport.events import Event, EventSink
from agent.transport.subscriptions import Incoming
from agent.util import jsonlimits, names, redact
from agent.util.timefmt import utc_iso
from agent.util.worker import Worker

log = logging.getLogger(__name__)

# Requests waiting beyond this are refused (a flood of commands must not grow memory without bound).
QUEUE_LIMIT = 100
# How often the idle dispatcher thread looks at its stop flag.
STOP_POLL_S = 0.2
MAX_PAYLOAD_BYTES = 64 * 1024  # no command's arguments come near; a larger payload is bad_json unread


class CommandError(Exception):
    """A handler's refusal with a code the requester can act on."""

    def __init__(self, message: str, code: str = "failed") -> None:
        message = redact.text(message)  # an error never carries a secret (agent.util.redact)
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Arg:
    type: type | tuple[type, ...]
    required: bool = False
    choices: tuple[object, ...] = ()
    help: str = ""
    pattern: str | None = None  # a name that may become a path: agent.util.names.NAME_PATTERN or VERSION_PATTERN

    def describe(self) -> str:
        words = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", float: "a number"}
        kinds = self.type if isinstance(self.type, tuple) else (self.type,)
        text = " or ".join(words.get(k, k.__name__) for k in kinds)
        if self.choices:
            text = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        return text


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    args: dict[str, Arg] = field(default_factory=dict)


NAME = names.NAME_PATTERN
# The commands of DESIGN.md and their arguments; handlers come from the daemon.
SPECS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec("ping", "answer at once: is the agent alive, since when"),
        CommandSpec(
            "update",
            "check the registry for new model versions now",
            {"model": Arg(str, help="only this model", pattern=NAME)},
        ),
        CommandSpec(
            "rollback",
            "go back to the previous version of a model",
            {
                "model": Arg(str, required=True, pattern=NAME),
                "version": Arg(str, help="this version instead of the previous one", pattern=names.VERSION_PATTERN),
            },
        ),
        CommandSpec("reload", "re-read the profile; keep the running one if the new one is invalid"),
        CommandSpec(
            "pipeline",
            "start or stop one pipeline",
            {
                "name": Arg(str, required=True, pattern=NAME),
                "action": Arg(str, required=True, choices=("start", "stop", "restart")),
            },
        ),
        CommandSpec("config", "the effective profile, secrets redacted"),
        CommandSpec(
            "snapshot",
            "one JPEG from a camera pipeline",
            {"pipeline": Arg(str, required=True, pattern=NAME), "max_width": Arg(int, help="scale down to this width")},
        ),
    )
}

# handler(arguments as checked against the command's spec) -> a JSON-able result
Handler = Callable[[dict[str, Any]], object]
Reply = Callable[[str, bytes, bytes | None], None]  # (topic, payload, correlation data)


def check_args(spec: CommandSpec, args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - set(spec.args) - {"id"})
    if unknown:
        known = ", ".join(sorted(spec.args)) or "none"
        raise CommandError(f"{unknown[0]}: unknown argument for {spec.name} (arguments: {known})", "bad_argument")
    for name, arg in spec.args.items():
        if name not in args:
            if arg.required:
                raise CommandError(f"{name}: required ({arg.describe()})", "bad_argument")
            continue
        value = args[name]
        kinds = arg.type if isinstance(arg.type, tuple) else (arg.type,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise CommandError(f"{name}: expected {arg.describe()}, got {json.dumps(value)}", "bad_argument")
        if arg.choices and value not in arg.choices:
            raise CommandError(f"{name}: expected {arg.describe()}, got {json.dumps(value)}", "bad_argument")
        if arg.pattern is not None:
            try:
                names.check(value, name, arg.pattern)
            except names.UnsafeNameError as exc:
                raise CommandError(str(exc), "bad_argument") from None


class CommandDispatcher:
    """Commands by name. `handle()` is pure (for tests); `attach()` wires it to a connection."""

    def __init__(self, device: str, *, events: EventSink | None = None, clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.events = events
        self._clock = clock
        self._started = clock()
        self._handlers: dict[str, Handler] = {"ping": self._ping}
        self._specs: dict[str, CommandSpec] = dict(SPECS)
        self._queue: queue.Queue[tuple[str, bytes, str | None, bytes | None]] = queue.Queue(QUEUE_LIMIT)
        self._reply: Reply | None = None
        self._reply_topic: Callable[[str], str] | None = None
        self._worker = Worker("commands", self._run)
        self._background: set[str] = set()
        self._running: dict[str, float] = {}  # background command -> when its request in progress began
        self._running_lock = threading.Lock()
        self.handled = 0

    def register(
        self, name: str, handler: Handler, spec: CommandSpec | None = None, *, background: bool = False
    ) -> None:
        """Handle `name` with `handler(args) -> JSON-able result` (bytes become base64). Raise
        CommandError(message, code) to refuse. `background`: the handler may wait (on the network): it
        runs on a thread of its own, one request at a time, never holding up the other commands."""
        if background:
            self._background.add(name)
        if spec is not None:
            self._specs[name] = spec
        elif name not in self._specs:
            self._specs[name] = CommandSpec(name, "", {})
        self._handlers[name] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def handle(self, name: str, payload: bytes, refuse: CommandError | None = None) -> dict[str, Any]:
        """Run one command; always returns a reply body, whatever the payload. `refuse`: a request that
        passed its checks is answered with this error instead of running."""
        reply: dict[str, Any] = {"device": self.device, "command": name}
        try:
            args = self._parse(payload)
            if isinstance(args.get("id"), (str, int)) and not isinstance(args["id"], bool):
                reply["id"] = args["id"]
            handler = self._checked(name, args)
            if refuse is not None:
                raise refuse
            result = handler({k: v for k, v in args.items() if k != "id"})
            if isinstance(result, (bytes, bytearray)):
                result = {"data_base64": base64.b64encode(bytes(result)).decode(), "bytes": len(result)}
            reply.update(ok=True, ts=utc_iso(self._clock()), result=result)
        except CommandError as exc:
            reply.update(ok=False, ts=utc_iso(self._clock()), error={"code": exc.code, "message": exc.message})
            self._event(name, exc.code, exc.message)
        except Exception as exc:  # a handler's bug is an error reply, never a crash
            log.exception("command %s failed", name)
            message = redact.text(f"{type(exc).__name__}: {exc}")
            reply.update(ok=False, ts=utc_iso(self._clock()), error={"code": "failed", "message": message})
            self._event(name, "failed", message)
        self.handled += 1
        return reply

    # ---- wiring to MQTT ----------------------------------------------------------------------

    def attach(self, connection: Connection) -> CommandDispatcher:
        """Subscribe to `<prefix>/<device>/cmd/+` (again on every connect); what arrives waits in the bounded
        queue until `start`, then is answered on the dispatcher thread."""
        topics = connection.topics

        def reply(topic: str, payload: bytes, correlation: bytes | None) -> None:
            if connection.publish(topic, payload, qos=1, properties=reply_properties(correlation)) is None:
                log.warning("command reply to %s not sent: %s", topic, _not_sent(connection, topic, payload))

        self._reply = reply
        self._reply_topic = topics.reply

        def on_message(msg: Incoming) -> None:
            name = topics.command_name(msg.topic)
            if name is None:
                return
            try:
                self._queue.put_nowait((name, msg.payload, msg.response_topic, msg.correlation_data))
            except queue.Full:
                log.warning("command %s refused: %d commands already waiting", name, QUEUE_LIMIT)

        connection.subscribe(topics.commands, on_message, qos=1)
        return self

    def start(self) -> CommandDispatcher:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()

    def _run(self) -> None:
        while not self._worker.stopping.is_set():
            try:
                name, payload, response_topic, correlation = self._queue.get(timeout=STOP_POLL_S)
            except queue.Empty:
                continue
            if response_topic and not _publishable(response_topic):  # none, or empty: the command's reply topic
                # MQTT 5 lets the requester name any string; a broker passes on wildcards, which paho refuses
                # to publish to (a traceback, no reply). Refused unrun, answered on the command's own topic.
                where = CommandError(
                    f"response topic {response_topic[:80]!r} is not a topic to publish to", "bad_argument"
                )
                self._answer(name, self.handle(name, payload, refuse=where), None, correlation)
            elif name in self._background and self._acceptable(name, payload):
                self._start_background(name, payload, response_topic, correlation)
            else:  # a background command's bad request too: refused at once, never queued behind a wait
                self._answer(name, self.handle(name, payload), response_topic, correlation)

    def _acceptable(self, name: str, payload: bytes) -> bool:
        try:
            self._checked(name, self._parse(payload))
        except CommandError:
            return False
        return True

    def _start_background(
        self, name: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None:
        with self._running_lock:
            began = self._running.get(name)
            if began is None:
                self._running[name] = time.monotonic()
        if began is not None:
            busy = CommandError(
                f"{name} is already running (for {time.monotonic() - began:.0f} s); its reply comes when it ends"
            )
            self._answer(name, self.handle(name, payload, refuse=busy), response_topic, correlation)
            return

        def run() -> None:
            try:
                self._answer(name, self.handle(name, payload), response_topic, correlation)
            finally:
                with self._running_lock:
                    self._running.pop(name, None)

        threading.Thread(target=run, name=f"command-{name}", daemon=True).start()

    def _answer(self, name: str, body: dict[str, Any], response_topic: str | None, correlation: bytes | None) -> None:
        topic = response_topic or (self._reply_topic(name) if self._reply_topic else None)
        if self._reply is not None and topic:
            try:
                self._reply(topic, json.dumps(body, separators=(",", ":"), default=str).encode(), correlation)
            except Exception:
                log.exception("command %s: reply failed", name)

    # ---- internals ---------------------------------------------------------------------------

    def _checked(self, name: str, args: dict[str, Any]) -> Handler:
        """The handler of a known command whose arguments fit its spec (CommandError otherwise)."""
        spec = self._specs.get(name)
        if spec is None:
            raise CommandError(f"unknown command {name!r} (commands: {', '.join(self.commands)})", "unknown_command")
        handler = self._handlers.get(name)
        if handler is None:
            raise CommandError(f"{name} is not available on this agent", "not_available")
        check_args(spec, args)
        return handler

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if not payload.strip():
            return {}
        try:
            args = jsonlimits.loads(payload, max_bytes=MAX_PAYLOAD_BYTES)
        except ValueError as exc:
            raise CommandError(f"payload refused: {exc}", "bad_json") from None
        if not isinstance(args, dict):
            raise CommandError(f"payload must be a JSON object of arguments, got {type(args).__name__}", "bad_json")
        return args

    def _ping(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "uptime_s": round(self._clock() - self._started, 1)}

    def _event(self, name: str, code: str, message: str) -> None:
        if self.events is not None:
            try:
                self.events(Event("command.error", {"command": name, "code": code, "message": message}))
            except Exception:
                log.exception("command event failed")


def _not_sent(connection: Connection, topic: str, payload: bytes) -> str:
    """Why the connection did not take a reply: offline, or too large for this broker (the limit it broke)."""
    if not connection.online:
        return "offline"
    return connection.limits.too_large(topic, len(payload), 1) or "the MQTT client refused it (see the line before)"


def _publishable(topic: str) -> bool:
    """A topic a PUBLISH may name: no wildcard or NUL, within MQTT's 65,535 bytes."""
    return not {"+", "#", "\0"} & set(topic) and len(topic.encode("utf-8", "surrogatepass")) <= 65535
