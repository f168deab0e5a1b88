"""What this device has, which ONNX Runtime providers really run a model here, and what this runtime can load."""
