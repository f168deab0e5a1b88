"""Where frames and sensor windows come from: one plug-in module per `source.type`."""

from __future__ import annotations

from agent.util.plugins import discover

MODULES = ("camera", "video", "images", "synthetic", "csv", "jsonl", "serial", "iio", "mqtt", "audio")

SOURCES = discover(__name__, MODULES)
