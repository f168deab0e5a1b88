"""Which model versions the device serves, as health reports them: per model, the version really
serving, its digest, the provider really running it, its pipelines, and the versions held back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.inference.pipeline import Pipeline
    from agent.models.store import Store


def models_health(pipelines: Iterable[Pipeline], store: Store | None) -> dict[str, dict[str, object]]:
    """{model: {version, provider, pipelines, digest, held}} from what the pipelines run now."""
    out: dict[str, dict[str, object]] = {}
    serving: dict[str, list[str]] = {}
    for pipeline in pipelines:
        model = pipeline.model
        if model.name not in out:
            serving[model.name] = []
            out[model.name] = {"version": model.version, "provider": model.provider, "pipelines": serving[model.name]}
        serving[model.name].append(pipeline.name)
        if store is not None and not pipeline.config.model_is_file:
            active = store.active(pipeline.config.model)
            if active is not None:
                out[model.name]["digest"] = active.digest
            out[model.name]["held"] = store.held(pipeline.config.model)
    return out
