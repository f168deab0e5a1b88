"""Pipelines from the profile: each one's model loaded (a file from the profile, or the version the model
store resolved) and wired to its source and sink.

At start the first frame is the warm-up: a warm-up run on a blank frame before it would cost one more
inference on the way to the first result (the first run is the slow one: it allocates the arena), and
a model that cannot take the frames fails on the first one as it would on the blank (`inference.error`,
and no result from it). A hot swap still warms the new model before it serves (`Pipeline.swap`), and so
does a start on a version still on trial (the crash guard watches its load): a death while it warms up
must count as one, and a death after the pipelines are up must not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

from agent.config.profile import MqttConfig, PipelineConfig, Profile, RuntimeConfig
from agent.device.graphprep import StreamPlan
from agent.inference.pipeline import Pipeline
from agent.inference.processing.lazy import preload_opencv
from agent.inference.runtime import ModelError
from agent.inference.sessions import POOL
from agent.inference.sources import source_class
from agent.inference.sources.base import Subscriptions
from agent.inference.warmup import example_input, load_pipeline_model, stream_plans
from agent.transport.events import Event, EventSink, Sink, log_event

# (model, version) -> whether that version is on trial: the crash guard watches its load and warm-up.
OnTrial = Callable[[str, str], bool]
# A pipeline's registry model -> (its active file or bytes, version): the model store's `resolve`.
Resolver = Callable[[PipelineConfig], tuple[Path | bytes, str | None]]


def open_pipeline(
    config: PipelineConfig,
    sink: Sink,
    *,
    device: str,
    runtime: RuntimeConfig,
    state_dir: Path,
    emit: EventSink = log_event,
    model_path: Path | bytes | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    qos: int = 1,
    mqtt: MqttConfig | None = None,
    connection: Subscriptions | None = None,
    warm: bool = False,
    plan: StreamPlan | None = None,
) -> Pipeline:
    """Load the pipeline's model (a file from the profile, or what the store resolved) and build it;
    `warm`: run it once on a blank frame before it serves (a version on trial); `plan`: how the pipeline
    feeds the model (`stream_plans`), for this load and its swaps."""
    if not source_class(config.source).sensor:
        preload_opencv()
    model = load_pipeline_model(
        config,
        model_path if model_path is not None else Path(config.model),
        runtime,
        state_dir,
        name=model_name or (Path(config.model).stem if config.model_is_file else config.model),
        version=model_version,
        warmup_runs=0,
        emit=emit,
        plan=plan,
        interim=not warm,  # a version on trial opens on its provider: the crash guard watches that open
    )
    if warm:
        model.warmup(example_input(config, model), runs=1)
    return Pipeline(
        config,
        model,
        sink,
        device=device,
        runtime=runtime,
        state_dir=state_dir,
        emit=emit,
        qos=qos,
        mqtt=mqtt,
        connection=connection,
        plan=plan,
    )


def open_pipelines(
    profile: Profile,
    sink: Sink,
    emit: EventSink = log_event,
    resolve: Resolver | None = None,
    mqtt: Subscriptions | None = None,
    on_trial: OnTrial | None = None,
    only: Collection[str] | None = None,
) -> Iterator[Pipeline]:
    """Every enabled pipeline of a profile whose model loads (those named in `only`, when given), each as
    soon as it has loaded (so that the first one can start serving while the next one loads); the others
    are reported and skipped. Threads are shared out over all the profile's camera pipelines.

    `resolve` maps a registry model name to (file or bytes, version): the store's job. Without it only
    file models run. `mqtt` is the daemon's broker connection, which mqtt sources then share; without it
    they open their own from the profile's mqtt section. A pipeline that cannot start never keeps the
    others from starting.
    """
    state_dir = Path(profile.device.state_dir)
    default_qos = profile.mqtt.qos if profile.mqtt is not None else 1
    enabled = [config for config in profile.pipelines if config.enabled]
    # Camera pipelines run their inferences at once on the stage pool: CPU runs get a share of the threads each.
    POOL.plan(sum(1 for config in enabled if source_class(config.source).live))
    plans = stream_plans(enabled, profile.runtime, endpoint=profile.endpoint.enabled)
    for config in enabled:
        if only is not None and config.name not in only:
            continue
        try:
            path: Path | bytes
            if config.model_is_file:
                path, version = Path(config.model), None
            elif resolve is not None:
                path, version = resolve(config)
            else:
                raise ModelError(f"model {config.model!r} comes from the registry, and no model store is wired here")
            pipeline = open_pipeline(
                config,
                sink,
                device=profile.device.id,
                runtime=profile.runtime,
                state_dir=state_dir,
                emit=emit,
                model_path=path,
                model_version=version,
                qos=default_qos,
                mqtt=profile.mqtt,
                connection=mqtt,
                warm=version is not None and on_trial is not None and on_trial(config.model, version),
                plan=plans[config.name],
            )
        except (ModelError, OSError, ValueError) as exc:
            emit(Event("pipeline.failed", {"pipeline": config.name, "model": config.model, "reason": str(exc)}))
            continue
        yield pipeline


def start_pipelines(pipelines: Iterable[Pipeline], settle: float = 0.0) -> list[Pipeline]:
    """Start each pipeline as soon as its model has loaded (`open_pipelines` yields them so). With `settle`,
    they announce themselves (`pipeline.started`) once their first results are out, or after `settle`
    seconds: what the caller does next, and those events, then take nothing from the first frames."""
    started = [pipeline.start(announce=not settle) for pipeline in pipelines]
    if settle:
        deadline = time.monotonic() + settle
        for pipeline in started:
            pipeline.wait_served(max(0.0, deadline - time.monotonic()))
        for pipeline in started:
            pipeline.announce()
    return started
