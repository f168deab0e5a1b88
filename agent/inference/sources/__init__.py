"""Where frames and sensor windows come from: one plug-in module per `source.type`, and the registry."""

from __future__ import annotations

from agent.config.base import PluginConfig
from agent.inference.sources.base import BaseSource, SourceContext
from agent.util.plugins import Plugins

MODULES = ("camera", "video", "images", "synthetic", "csv", "jsonl", "serial", "iio", "mqtt", "audio")

SOURCES = Plugins(__name__, MODULES)


def source_class(config: PluginConfig) -> type[BaseSource[PluginConfig]]:
    """The plug-in class registered for `config.type` (its `example` needs no instance)."""
    cls: type[BaseSource[PluginConfig]] = SOURCES[config.type].Source
    return cls


def make_source(config: PluginConfig, ctx: SourceContext | None = None) -> BaseSource[PluginConfig]:
    """The plug-in registered for `config.type`, built from its config."""
    return source_class(config)(config, ctx)
