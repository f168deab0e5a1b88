"""Every event type the agent publishes on `<prefix>/<device>/events`: one model per type, keyed by type.

A model holds an event's own fields; the envelope (`device`, `seq`, `ts`, `type`) is the sink's (see
`agent.transport.contract.wire`). The rules every model follows: an event about a model version names
that version in `version` (a rollback: the version rolled back from, the bad one; `to` is the version
now active); `reason` is one human line; an event caused by a deployment order carries its id in
`order`. The class docstrings are the "when" of docs/events.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from agent.transport.contract.base import ContractError, Text, Wire, check_model

# Why a version was rolled back: its probation failed, it killed the process while loading (the crash
# guard), an operator asked (the rollback command or a rollback order), or it did not load in a pipeline.
RollbackCause = Literal["probation", "crash_guard", "command", "test_vectors", "load"]


class EventBody(Wire):
    """The fields of one event type. A concrete model names its type in `TYPE`."""

    TYPE: ClassVar[str]


# ---- the agent and its profile -----------------------------------------------------------------


class AgentStarted(EventBody):
    """The daemon is serving."""

    TYPE: ClassVar[str] = "agent.started"
    version: Text  # the agent's own version
    pipelines: list[str]


class ProfileInvalid(EventBody):
    """A reload (SIGHUP or the `reload` command) found an invalid profile; the running one stays."""

    TYPE: ClassVar[str] = "profile.invalid"
    reason: Text  # the first `FILE:LINE: key: message`
    errors: int


class ProfileReloaded(EventBody):
    """A reload took effect."""

    TYPE: ClassVar[str] = "profile.reloaded"
    pipelines: list[str]


class UpdateError(EventBody):
    """An update step failed unexpectedly; the loop goes on."""

    TYPE: ClassVar[str] = "update.error"
    reason: Text


class OutboxDropped(EventBody):
    """The outbox bound (bytes or age) dropped the oldest messages, or a full disk had no room for some."""

    TYPE: ClassVar[str] = "outbox.dropped"
    count: int
    total: int
    max_bytes: int
    reason: Text
    disk: int = 0  # of `count`, those lost because the disk was full


class CommandErrorEvent(EventBody):
    """A remote command was refused or failed."""

    TYPE: ClassVar[str] = "command.error"
    command: Text
    code: Text
    message: Text


class DeployRefused(EventBody):
    """A deployment order was not acted on (bad signature, unknown key, expired, not JSON)."""

    TYPE: ClassVar[str] = "deploy.refused"
    topic: Text
    order: str | None  # the id the order claims, when it could be read
    reason: Text


class DeployWithdrawn(EventBody):
    """A deployment order was withdrawn (an empty retained payload on its topic): the device forgot it
    and follows what is left (another order, else its profile's channel or pin)."""

    TYPE: ClassVar[str] = "deploy.withdrawn"
    model: Text
    version: Text  # the version the order named
    order: Text
    topic: Text


# ---- model versions --------------------------------------------------------------------------------


class ModelEvent(EventBody):
    """Fields of every event about one version of a model (only a refusal or an error may lack it)."""

    model: Text
    version: str | None
    order: str | None = None  # the deployment order that caused it


class ModelDownloading(ModelEvent):
    """A version's file is being fetched."""

    TYPE: ClassVar[str] = "model.downloading"
    version: Text
    variant: Text
    bytes: int
    resume_from: int
    preference: Text | None = None  # why this variant, for the provider that will run it (agent.models.variants)


class ModelVerifying(ModelEvent):
    """Digest, signature and test vectors are being checked."""

    TYPE: ClassVar[str] = "model.verifying"
    version: Text
    variant: Text


class ModelActivated(ModelEvent):
    """The store switched to a verified, tested version."""

    TYPE: ClassVar[str] = "model.activated"
    version: Text
    variant: Text
    provider: Text
    previous: str | None  # the version active before
    preference: Text | None = None  # why this variant (as in model.downloading)


class ModelActive(ModelEvent):
    """Every pipeline serving the model runs the new version."""

    TYPE: ClassVar[str] = "model.active"
    version: Text
    previous: str | None
    provider: Text


class ModelRefused(ModelEvent):
    """A version cannot run here; nothing was activated."""

    TYPE: ClassVar[str] = "model.refused"
    version: str | None  # None: the channel itself could not be read
    reason: Text


class ModelErrorEvent(ModelEvent):
    """The registry or the disk failed (retried at the next poll)."""

    TYPE: ClassVar[str] = "model.error"
    version: str | None = None  # None: no version was involved yet
    reason: Text


class ModelProbationPassed(ModelEvent):
    """A new version served its probation."""

    TYPE: ClassVar[str] = "model.probation_passed"
    version: Text


class ModelRolledBack(ModelEvent):
    """Back from a bad version (`version`) to the one before (`to`)."""

    TYPE: ClassVar[str] = "model.rolled_back"
    version: Text
    to: str | None  # the version active now
    reason: Text
    cause: RollbackCause


class ModelRollbackFailed(ModelEvent):
    """A version should have been rolled back, and there was no version to go back to: it still serves."""

    TYPE: ClassVar[str] = "model.rollback_failed"
    version: Text
    reason: Text
    cause: RollbackCause


# ---- execution providers -------------------------------------------------------------------------


class ProviderFallback(EventBody):
    """A provider could not run the model; the next one in the ranking is tried."""

    TYPE: ClassVar[str] = "provider.fallback"
    provider: Text
    reason: Text
    next: str | None  # None: nothing left to try


class ProviderSwitched(EventBody):
    """The provider chosen opened beside the interim CPU session that served the first frames, and its
    pipelines switched to it between two runs (`runtime.start_on_cpu`)."""

    TYPE: ClassVar[str] = "provider.switched"
    model: Text
    provider: Text
    previous: Text
    seconds: float  # from the first run to the switch: the open and the new session's first run


class AutotuneTrial(Wire):
    """One provider and thread count as autotune timed it."""

    label: Text
    provider: Text
    threads: int
    verified: str | None  # the provider the session proved to run on
    runs: int
    p50_ms: float | None
    p95_ms: float | None
    throughput: float | None
    error: str | None


class ProviderAutotuned(EventBody):
    """Autotune timed the usable providers and thread counts, and kept the fastest."""

    TYPE: ClassVar[str] = "provider.autotuned"
    provider: Text
    threads: int
    p50_ms: float | None
    trials: list[AutotuneTrial]


# ---- pipelines -----------------------------------------------------------------------------------


class PipelineEvent(EventBody):
    """Fields of every event about one pipeline."""

    pipeline: Text


class Folded(PipelineEvent):
    """An event whose repeats within 10 s are folded into the next one's `repeated` count."""

    reason: Text
    repeated: int | None = None


class PipelineStarted(PipelineEvent):
    """A pipeline started serving."""

    TYPE: ClassVar[str] = "pipeline.started"
    model: Text
    version: Text
    provider: Text
    source: Text  # the source's type


class PipelineStopped(PipelineEvent):
    """A pipeline was stopped."""

    TYPE: ClassVar[str] = "pipeline.stopped"
    results: int


class PipelineFinished(PipelineEvent):
    """A finite source (a file) ended and every result was published."""

    TYPE: ClassVar[str] = "pipeline.finished"
    results: int


class PipelineFailed(Folded):
    """A pipeline could not start, or one of its stages failed."""

    TYPE: ClassVar[str] = "pipeline.failed"
    model: str | None = None  # set when the pipeline could not start


class ModelSwapped(PipelineEvent):
    """One pipeline switched models between two frames."""

    TYPE: ClassVar[str] = "model.swapped"
    model: Text
    version: Text
    previous: Text
    provider: Text


class InferenceError(Folded):
    """An inference failed; the frame is dropped and counted."""

    TYPE: ClassVar[str] = "inference.error"
    model: Text
    version: Text
    source_seq: int


class PostprocessError(Folded):
    """Post-processing failed on one result; it is dropped and counted."""

    TYPE: ClassVar[str] = "postprocess.error"
    source_seq: int


class SinkError(Folded):
    """A result could not be handed to the outbox (or stdout); it is counted."""

    TYPE: ClassVar[str] = "sink.error"


class FrameRejected(Folded):
    """A frame, row or payload could not be used (wrong size, unparsable line, a text file in an image folder)."""

    TYPE: ClassVar[str] = "frame.rejected"
    source: str | None = None  # the source's type, when the source itself rejected it
    source_seq: int | None = None  # the frame's number, when preprocessing rejected it
    file: str | None = None  # the file, for a folder of images


# ---- sources -------------------------------------------------------------------------------------


class SourceEvent(PipelineEvent):
    """Fields of every event a source sends about itself."""

    source: Text  # the source's type


class SourceLost(SourceEvent):
    """A camera, stream, serial port, IIO device or broker source stopped delivering; it is retried."""

    TYPE: ClassVar[str] = "source.lost"
    reason: Text
    topic: str | None = None  # an mqtt source's topic


class SourceRecovered(SourceEvent):
    """A lost source delivers again."""

    TYPE: ClassVar[str] = "source.recovered"
    failed_attempts: int | None = None  # a camera's reconnects that failed while it was lost (folded)


class SourceConnected(SourceEvent):
    """An mqtt source on its own broker connection subscribed."""

    TYPE: ClassVar[str] = "source.connected"
    topic: Text


class SourceFrozen(SourceEvent):
    """A camera delivered the same picture for `frozen_after`."""

    TYPE: ClassVar[str] = "source.frozen"
    reason: Text


class SourceUnfrozen(SourceEvent):
    """A frozen camera's picture changes again."""

    TYPE: ClassVar[str] = "source.unfrozen"


class SourceOverflow(SourceEvent):
    """An mqtt source fell behind and dropped messages."""

    TYPE: ClassVar[str] = "source.overflow"
    reason: Text


class SourceError(SourceEvent):
    """A source failed: retried after `retry_in_s`, or not at all (`retry` false: e.g. a corrupt video)."""

    TYPE: ClassVar[str] = "source.error"
    reason: Text
    retry: bool | None = None
    retry_in_s: float | None = None
    repeated: int | None = None


def _concrete(base: type[EventBody]) -> list[type[EventBody]]:
    found = []
    for cls in base.__subclasses__():
        if "TYPE" in cls.__dict__:
            found.append(cls)
        found.extend(_concrete(cls))
    return found


# Every event type, by its `type`: what a producer may emit and what the fleet side can read.
EVENTS: dict[str, type[EventBody]] = {cls.TYPE: cls for cls in _concrete(EventBody)}


def event_body(type_: str, fields: object) -> EventBody:
    """The fields of an event of `type_`, validated; ContractError naming the type and the field."""
    model = EVENTS.get(type_)
    if model is None:
        raise ContractError(f"event {type_!r}", "not an event type of the contract (agent.transport.contract)")
    return check_model(model, fields, f"event {type_}")
