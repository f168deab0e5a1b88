"""Post-processors: one plug-in module per `postprocess.type`."""

from __future__ import annotations

from agent.util.plugins import discover

MODULES = ("raw", "classification", "detection", "text_detection", "threshold", "anomaly")

POSTPROCESSORS = discover(__name__, MODULES)
