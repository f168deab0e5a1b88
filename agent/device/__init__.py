"""The device side: what this device has, which ONNX Runtime provider really runs a model here, and what
this runtime can load.

hardware (with accelerators, read through sysroot) -> providers (rank) -> build (one session, verified)
-> autotune (measure) -> session (open_session: the chain with fallback). compat checks what a model
needs against the runtime's limits; onnxproto is the ONNX protobuf, read and written by hand.
"""
