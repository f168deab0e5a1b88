"""Pipelines from the profile: each one's model loaded (a file from the profile, or the version the model
store resolved), warmed on an input shaped like its frames, and wired to its source and sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from agent.config.profile import MqttConfig, PipelineConfig, Profile, RuntimeConfig
from agent.inference.pipeline import Pipeline
from agent.inference.runtime import ModelError
from agent.inference.sources.base import Subscriptions
from agent.inference.warmup import example_input, load_pipeline_model
from agent.transport.events import Event, EventSink, Sink, log_event

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
) -> Pipeline:
    """Load the pipeline's model (a file from the profile, or what the store resolved) and build it."""
    model = load_pipeline_model(
        config,
        model_path if model_path is not None else Path(config.model),
        runtime,
        state_dir,
        name=model_name or (Path(config.model).stem if config.model_is_file else config.model),
        version=model_version,
        warmup_runs=0,
        emit=emit,
    )
    example = example_input(config, model)
    if example is not None:
        # One run allocates and proves the model takes these frames; a second would only delay the first result.
        model.warmup(example, runs=1)
    else:
        model.warmup_if_possible()
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
    )


def open_pipelines(
    profile: Profile,
    sink: Sink,
    emit: EventSink = log_event,
    resolve: Resolver | None = None,
    mqtt: Subscriptions | None = None,
) -> Iterator[Pipeline]:
    """Every enabled pipeline of a profile whose model loads, each as soon as it has loaded (so that the
    first one can start serving while the next one loads); the others are reported and skipped.

    `resolve` maps a registry model name to (file or bytes, version): the store's job. Without it only
    file models run. `mqtt` is the daemon's broker connection, which mqtt sources then share; without it
    they open their own from the profile's mqtt section. A pipeline that cannot start never keeps the
    others from starting.
    """
    state_dir = Path(profile.device.state_dir)
    default_qos = profile.mqtt.qos if profile.mqtt is not None else 1
    for config in profile.pipelines:
        if not config.enabled:
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
            )
        except (ModelError, OSError, ValueError) as exc:
            emit(Event("pipeline.failed", {"pipeline": config.name, "model": config.model, "reason": str(exc)}))
            continue
        yield pipeline
