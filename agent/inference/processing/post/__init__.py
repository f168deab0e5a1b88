"""Post-processors: one plug-in module per `postprocess.type`, and the registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.config.base import PluginConfig
from agent.inference.processing.post.base import BasePostprocessor
from agent.util.plugins import Plugins

MODULES = ("raw", "classification", "detection", "text_detection", "threshold", "anomaly")

POSTPROCESSORS = Plugins(__name__, MODULES)


def make_postprocessor(
    config: PluginConfig, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
) -> BasePostprocessor[PluginConfig]:
    """The plug-in registered for `config.type`, built for a model with these outputs."""
    cls: type[BasePostprocessor[PluginConfig]] = POSTPROCESSORS[config.type].Postprocessor
    return cls(config, output_names, output_types)
