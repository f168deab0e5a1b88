"""What crosses the wire: topics, the event contract, the durable outbox, the broker connection, result sinks."""
