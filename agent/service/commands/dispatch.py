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

Refused unrun, before any of that: a command delivered as a retained message (it would run again at every
connect), and a response topic under the agent's topic prefix other than this device's own
`<prefix>/<device>/cmd/+/reply/#` (a reply must never land on another device's topics, a deploy topic, or
its own status, results or commands). A command name that is not a name (agent.util.names) is an
`unknown_command` whose reply and event repeat it cut short. What a flood repeats (a full queue, an event
over EVENTS_PER_S, a reply not sent) is counted, and logged once per TALLY_EVERY_S (`Tally`).
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

import paho.mqtt.client as paho

from agent.transport.connection import Connection, reply_properties
from agent.transport.events import Event, EventSink
from agent.transport.subscriptions import Incoming
from agent.transport.topics import Topics
from agent.util import jsonlimits, names, redact
from agent.util.printable import printable
from agent.util.ratelimit import RateLimit
from agent.util.timefmt import utc_iso
from agent.util.worker import Worker

log = logging.getLogger(__name__)

# Requests waiting beyond this are refused (a flood of commands must not grow memory without bound).
QUEUE_LIMIT = 100
# How often the idle dispatcher thread looks at its stop flag.
STOP_POLL_S = 0.2
MAX_PAYLOAD_BYTES = 64 * 1024  # no command's arguments come near; a larger payload is bad_json unread
# command.error events past this many a second are counted, not sent: each is a record in the outbox on disk
# and a log line, and 20,000 bad commands in half a second made 9,908 of them.
EVENTS_PER_S = 10
# A refusal a flood repeats is logged at once, then as one line with its count at most this often (a full
# queue logged one warning per command refused: 10,092 lines for the same 20,000).
TALLY_EVERY_S = 10.0
RETAINED = (
    "a retained command is not run (it would run again at every connect); send commands without the retain "
    "flag, and clear this one with an empty retained message"
)


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


@dataclass(frozen=True)
class Request:
    """A command as it waits in the queue. A payload over MAX_PAYLOAD_BYTES is refused unread, so it waits as
    its size alone: 100 waiting commands of 1 MiB held 107 MiB of the agent while the dispatcher was busy."""

    name: str
    payload: bytes
    size: int  # of the payload as it came
    response_topic: str | None = None
    correlation: bytes | None = None
    retained: bool = False

    @classmethod
    def of(cls, name: str, msg: Incoming) -> Request:
        size = len(msg.payload)
        payload = msg.payload if size <= MAX_PAYLOAD_BYTES else b""
        return cls(name, payload, size, msg.response_topic, msg.correlation_data, msg.retain)


class Tally:
    """One kind of refusal that a flood repeats: every one counted, the first logged at once, then one line
    with the count of those since at most every `every` seconds, and what is left when `flush`ed."""

    def __init__(self, every: float = TALLY_EVERY_S) -> None:
        self.count = 0
        self._unsaid = 0
        self._last = ""
        self._line = RateLimit(1, window=every)
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self.count += 1
            self._unsaid += 1
            self._last = line
            if not self._line.allow():
                return
            unsaid, self._unsaid = self._unsaid, 0
        self._say(unsaid, line)

    def flush(self) -> None:
        with self._lock:
            unsaid, self._unsaid = self._unsaid, 0
        if unsaid:
            self._say(unsaid, self._last)

    def _say(self, unsaid: int, line: str) -> None:
        if unsaid == 1:
            log.warning("%s", line)
        else:
            log.warning("%s (%d since the last line, %d in all)", line, unsaid, self.count)


class CommandDispatcher:
    """Commands by name. `handle()` is pure (for tests); `attach()` wires it to a connection."""

    def __init__(self, device: str, *, events: EventSink | None = None, clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.events = events
        self._clock = clock
        self._started = clock()
        self._handlers: dict[str, Handler] = {"ping": self._ping}
        self._specs: dict[str, CommandSpec] = dict(SPECS)
        self._queue: queue.Queue[Request] = queue.Queue(QUEUE_LIMIT)
        self._reply: Reply | None = None
        self._topics: Topics | None = None
        self._worker = Worker("commands", self._run)
        self._background: set[str] = set()
        self._running: dict[str, float] = {}  # background command -> when its request in progress began
        self._running_lock = threading.Lock()
        self._event_rate = RateLimit(EVENTS_PER_S)
        self.handled = 0
        # Refusals a flood repeats, counted (and logged a line per TALLY_EVERY_S).
        self.dropped = Tally()  # the queue was full
        self.quieted = Tally()  # a command.error event over EVENTS_PER_S
        self.unsent = Tally()  # a reply with no topic to go to, or not taken by the connection

    def register(
        self, name: str, handler: Handler, spec: CommandSpec | None = None, *, background: bool = False
    ) -> None:
        """Handle `name` with `handler(args) -> JSON-able result` (bytes become base64). Raise
        CommandError(message, code) to refuse. `background`: the handler may wait (on the network): it
        runs on a thread of its own, one request at a time, never holding up the other commands."""
        names.check(name, "command name")  # what `_checked` refuses to look up in a request: never reachable
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

    def handle(
        self, name: str, payload: bytes, refuse: CommandError | None = None, *, size: int | None = None
    ) -> dict[str, Any]:
        """Run one command; always returns a reply body, whatever the payload. `refuse`: a request that
        passed its checks is answered with this error instead of running. `size`: of the payload as it came,
        when `payload` is not all of it (refused unread)."""
        shown = _shown(name)
        reply: dict[str, Any] = {"device": self.device, "command": shown}
        try:
            args = self._parse(payload, len(payload) if size is None else size)
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
            self._event(shown, exc.code, exc.message)
        except Exception as exc:  # a handler's bug is an error reply, never a crash
            log.exception("command %s failed", name)
            message = redact.text(f"{type(exc).__name__}: {exc}")
            reply.update(ok=False, ts=utc_iso(self._clock()), error={"code": "failed", "message": message})
            self._event(shown, "failed", message)
        self.handled += 1
        return reply

    # ---- wiring to MQTT ----------------------------------------------------------------------

    def attach(self, connection: Connection) -> CommandDispatcher:
        """Subscribe to `<prefix>/<device>/cmd/+` (again on every connect); what arrives waits in the bounded
        queue until `start`, then is answered on the dispatcher thread."""
        topics = self._topics = connection.topics

        def reply(topic: str, payload: bytes, correlation: bytes | None) -> None:
            if connection.publish(topic, payload, qos=1, properties=reply_properties(correlation)) is None:
                why = _not_sent(connection, topic, payload)
                self.unsent.add(f"command reply to {printable(topic)} not sent: {why}")

        self._reply = reply

        def on_message(msg: Incoming) -> None:
            name = topics.command_name(msg.topic)
            if name is None:
                return
            try:
                self._queue.put_nowait(Request.of(name, msg))
            except queue.Full:
                self.dropped.add(f"command {_shown(name)} refused: {QUEUE_LIMIT} commands already waiting")

        connection.subscribe(topics.commands, on_message, qos=1)
        return self

    def start(self) -> CommandDispatcher:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()
        for tally in (self.dropped, self.quieted, self.unsent):
            tally.flush()

    def _run(self) -> None:
        while not self._worker.stopping.is_set():
            try:
                request = self._queue.get(timeout=STOP_POLL_S)
            except queue.Empty:
                continue
            name, payload, size, response_topic = request.name, request.payload, request.size, request.response_topic
            where = self._response_topic_refusal(name, response_topic)
            if where is not None:  # refused unrun, answered on the command's own reply topic
                self._answer(request, self.handle(name, payload, refuse=where, size=size), None)
            elif request.retained:  # the broker hands it over at every connect: never run
                retained = CommandError(RETAINED, "bad_argument")
                self._answer(request, self.handle(name, payload, refuse=retained, size=size), response_topic)
            elif name in self._background and self._acceptable(name, payload, size):
                self._start_background(request)
            else:  # a background command's bad request too: refused at once, never queued behind a wait
                self._answer(request, self.handle(name, payload, size=size), response_topic)

    def _response_topic_refusal(self, name: str, topic: str | None) -> CommandError | None:
        """Why a reply must not go to the request's response topic (None when none was named, or it may)."""
        if not topic:
            return None  # none, or empty: the command's reply topic
        if not _publishable(topic):
            # MQTT 5 lets the requester name any string; a broker passes on wildcards, which paho refuses
            # to publish to (a traceback, no reply).
            return CommandError(f"response topic {topic[:80]!r} is not a topic to publish to", "bad_argument")
        topics = self._topics
        if topics is None or not (topic == topics.prefix or topic.startswith(topics.prefix + "/")):
            return None  # beyond the agent's topics the broker's ACL decides (docs/mqtt.md)
        own = f"{topics.base}/cmd/+/reply/#"  # what the ACL of docs/mqtt.md lets a device write replies to
        if paho.topic_matches_sub(own, topic):
            return None
        return CommandError(
            f"response topic {topic[:80]!r} is another of the agent's topics: under {topics.prefix}/ a reply "
            f"goes only to {topics.base}/cmd/<command>/reply or below it",
            "bad_argument",
        )

    def _acceptable(self, name: str, payload: bytes, size: int) -> bool:
        try:
            self._checked(name, self._parse(payload, size))
        except CommandError:
            return False
        return True

    def _start_background(self, request: Request) -> None:
        name = request.name
        with self._running_lock:
            began = self._running.get(name)
            if began is None:
                self._running[name] = time.monotonic()
        if began is not None:
            busy = CommandError(
                f"{name} is already running (for {time.monotonic() - began:.0f} s); its reply comes when it ends"
            )
            self._answer(request, self.handle(name, request.payload, refuse=busy), request.response_topic)
            return

        def run() -> None:
            try:
                self._answer(request, self.handle(name, request.payload), request.response_topic)
            finally:
                with self._running_lock:
                    self._running.pop(name, None)

        threading.Thread(target=run, name=f"command-{name}", daemon=True).start()

    def _answer(self, request: Request, body: dict[str, Any], response_topic: str | None) -> None:
        topic = response_topic or self._reply_topic(request.name)
        if self._reply is None:
            return
        if topic is None:  # `<name>/reply` would be no topic: over MQTT's 65,535 bytes, or with a wildcard
            self.unsent.add(f"command {_shown(request.name)}: no reply, its name makes no reply topic")
            return
        try:
            self._reply(topic, json.dumps(body, separators=(",", ":"), default=str).encode(), request.correlation)
        except Exception:
            log.exception("command %s: reply failed", _shown(request.name))

    def _reply_topic(self, name: str) -> str | None:
        if self._topics is None:
            return None
        topic = f"{self._topics.base}/cmd/{name}/reply"
        return topic if _publishable(topic) else None

    # ---- internals ---------------------------------------------------------------------------

    def _checked(self, name: str, args: dict[str, Any]) -> Handler:
        """The handler of a known command whose arguments fit its spec (CommandError otherwise)."""
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(self.commands)
            try:
                names.check(name, "command")
            except names.UnsafeNameError as exc:  # the reply repeats it, cut short (agent.util.names)
                raise CommandError(f"{exc} (commands: {known})", "unknown_command") from None
            raise CommandError(f"unknown command {name!r} (commands: {known})", "unknown_command")
        handler = self._handlers.get(name)
        if handler is None:
            raise CommandError(f"{name} is not available on this agent", "not_available")
        check_args(spec, args)
        return handler

    @staticmethod
    def _parse(payload: bytes, size: int) -> dict[str, Any]:
        if size > MAX_PAYLOAD_BYTES:  # held as its size only (Request): jsonlimits' words for it
            raise CommandError(f"payload refused: {size} bytes, more than the {MAX_PAYLOAD_BYTES} allowed", "bad_json")
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

    def _event(self, shown: str, code: str, message: str) -> None:
        if self.events is None:
            return
        if not self._event_rate.allow():
            self.quieted.add(f"command.error events not sent: more than {EVENTS_PER_S} a second (the latest: {shown})")
            return
        try:
            self.events(Event("command.error", {"command": shown, "code": code, "message": message}))
        except Exception:
            log.exception("command event failed")


def _shown(name: str) -> str:
    """A command's name as replies, events and log lines repeat it: a name, or what came cut short."""
    try:
        return names.check(name, "command")
    except names.UnsafeNameError:
        return printable(name, names.ECHO_CHARS)


def _not_sent(connection: Connection, topic: str, payload: bytes) -> str:
    """Why the connection did not take a reply: offline, or too large for this broker (the limit it broke)."""
    if not connection.online:
        return "offline"
    return connection.limits.too_large(topic, len(payload), 1) or "the MQTT client refused it (see the line before)"


def _publishable(topic: str) -> bool:
    """A topic a PUBLISH may name: no wildcard or NUL, within MQTT's 65,535 bytes."""
    return not {"+", "#", "\0"} & set(topic) and len(topic.encode("utf-8", "surrogatepass")) <= 65535
