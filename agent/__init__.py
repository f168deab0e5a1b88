"""edge-agent: an edge inference daemon for ONNX models."""

__version__ = "0.1.0"
