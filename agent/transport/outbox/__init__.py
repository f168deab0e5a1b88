"""The durable outbox: every message bound for the broker waits here, on disk, until the broker acks it.

An append-only log of segment files (`<state_dir>/outbox/seg-<first id>.log`), chosen over SQLite in
WAL mode because it measured better for this access pattern (append at the tail, consume at the head):
SQLite wrote 13.8 KB to disk per 259-byte result (whole WAL pages per commit) and committed 9,000
results/s alone, 1,900/s end to end; the log stores the record (payload + 46 bytes + topic) once.
Messages keep their order: ids rise by one per message, and the publisher reads them in id order.

The parts, in the order a message meets them: `record` (the bytes of one message), `segments` (the
files: preallocated, memory-mapped, rolled and flushed off the lock), `acks` (what the broker has
acknowledged), `bound` (what is dropped at `max_bytes` and `max_age`), `state` (the ack pointer and
counters beside the segments), `recovery` (reading it all back after a crash), `reader` (the
publisher's position), `box` (the `Outbox` itself: put, peek, ack, prune, sync, stats, close), and
`fallback` (`open_outbox`: in `<state_dir>`, or in memory when the disk has no room at all).
"""

from agent.transport.outbox.box import DIRNAME, Outbox, OutboxStats
from agent.transport.outbox.fallback import open_outbox
from agent.transport.outbox.record import Message

__all__ = ["DIRNAME", "Message", "Outbox", "OutboxStats", "open_outbox"]
