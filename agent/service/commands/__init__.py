"""MQTT commands: the dispatcher (parsing, replies, bounds) and the daemon's handlers."""
