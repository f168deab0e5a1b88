"""Where a pipeline's results go: the durable outbox (MQTT), or JSON lines on stdout."""
