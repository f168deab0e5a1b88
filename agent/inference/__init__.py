"""Where a frame goes: sources, pre-processing, the shared ONNX Runtime model, post-processing, the pipeline loop."""
