"""Command replies, on `<prefix>/<device>/cmd/<name>/reply` or the request's MQTT 5 response topic.

The envelope is the same for every command; `result` has a model per command of the agent's own
(a command a program registers on its own dispatcher replies with any JSON).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, JsonValue, TypeAdapter, model_validator

from agent.transport.contract.base import Text, Timestamp, Wire, check, check_model

ErrorCode = Literal["bad_json", "bad_argument", "unknown_command", "not_available", "failed"]


class ReplyError(Wire):
    code: ErrorCode
    message: Text


class CommandReply(Wire):
    device: Text
    command: Text
    id: str | int | None = None  # the request's `id`, echoed (for MQTT 3.1.1 clients)
    ok: bool
    ts: Timestamp
    result: JsonValue = None  # ok only
    error: ReplyError | None = None  # not ok only

    @model_validator(mode="after")
    def _one_outcome(self) -> CommandReply:
        if self.ok != (self.error is None):
            raise ValueError("`error` is set exactly when `ok` is false")
        return self


class PingResult(Wire):
    pong: Literal[True]
    uptime_s: float


class UpdateSummary(Wire):
    """One model's outcome of an update."""

    model: Text
    status: Literal["activated", "current", "held", "refused", "failed", "active", "rolled-back"]
    version: str | None
    reason: str | None


class UpdateResult(Wire):
    models: list[UpdateSummary]


class RollbackResult(Wire):
    model: Text
    version: str | None  # the version active now
    from_: Text = Field(alias="from")  # the version rolled back from


class ReloadResult(Wire):
    """`reloaded`: nothing (the file is unchanged), the pipelines in `changed`, or the whole agent (the
    sections in `changed` differ; it restarts right after this reply). `pipelines`: those running after."""

    reloaded: Literal["nothing", "pipelines", "agent"]
    changed: list[str]
    pipelines: list[str]


class PipelineResult(Wire):
    pipeline: Text
    state: Text


class SnapshotResult(Wire):
    pipeline: Text
    width: int
    height: int
    jpeg_base64: str
    boxes: list[dict[str, JsonValue]]


class BytesResult(Wire):
    """What the dispatcher makes of a handler's bytes."""

    data_base64: str
    bytes: int


RESULTS: dict[str, TypeAdapter[Any]] = {
    "ping": TypeAdapter(PingResult),
    "update": TypeAdapter(UpdateResult),
    "rollback": TypeAdapter(RollbackResult),
    "reload": TypeAdapter(ReloadResult),
    "pipeline": TypeAdapter(PipelineResult),
    "config": TypeAdapter(dict[str, JsonValue]),  # the effective profile, secrets redacted
    "snapshot": TypeAdapter(SnapshotResult),
}


def check_reply(doc: object) -> CommandReply:
    """A reply, its result checked against its command's model; ContractError naming the field."""
    reply = check_model(CommandReply, doc, "reply")
    adapter = RESULTS.get(reply.command)
    if reply.ok and adapter is not None:
        check(adapter, reply.result, f"reply to {reply.command}: result")
    return reply
