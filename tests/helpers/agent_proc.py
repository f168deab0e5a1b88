"""The agent's MQTT side in a process of its own, for tests that kill it with SIGKILL.

    python -m tests.helpers.agent_proc URL STATE_DIR DEVICE COUNT [--rate N]

Puts COUNT results for pipeline `p` through the durable outbox (as the daemon would), prints
`put <seq>` after each hundred and `done <last seq>` at the end, then keeps running (publishing what is
left) until killed. Command `ping` is answered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from agent.config.profile import DeviceConfig, MqttConfig
from agent.service.commands.dispatch import CommandDispatcher
from agent.transport.connection import Connection
from agent.transport.outbox import open_outbox
from agent.transport.pump import OutboxPump
from agent.transport.sinks.outbox import OutboxSink


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("device")
    parser.add_argument("count", type=int)
    parser.add_argument("--rate", type=float, default=0.0, help="results per second (0: as fast as possible)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    agent = InProcessAgent(args.url, args.state_dir, args.device)
    outbox, sink = agent.outbox, agent.sink
    print(f"start {outbox.last_seq('results/p')}", flush=True)
    seq = 0
    for i in range(args.count):
        sink.result("p", {"output": {"i": i}}, 1)
        seq = outbox.last_seq("results/p")
        if seq % 100 == 0:
            print(f"put {seq}", flush=True)
        if args.rate:
            time.sleep(1.0 / args.rate)
    print(f"done {seq}", flush=True)
    while True:
        time.sleep(1)


class InProcessAgent:
    """The same wiring in the test's own process (for tests that need no SIGKILL)."""

    def __init__(self, url: str, state_dir: Path, device: str = "dev1", start: bool = True, **mqtt: object) -> None:
        mqtt.setdefault("keepalive", 5)
        self.mqtt = MqttConfig(url=url, **mqtt)  # type: ignore[arg-type]
        self.conn = Connection(
            self.mqtt, DeviceConfig(id=device, state_dir=state_dir), reconnect_min=0.05, reconnect_max=0.5
        )
        self.outbox = open_outbox(state_dir, self.mqtt.outbox)
        self.pump = OutboxPump(self.conn, self.outbox).start()
        self.sink = OutboxSink(self.outbox, self.conn.topics).start()
        self.commands = CommandDispatcher(device, events=self.sink.event).attach(self.conn).start()
        self.topics = self.conn.topics
        if start:
            self.conn.start()

    def stop(self) -> None:
        self.commands.stop()
        self.sink.stop()
        self.conn.stop()
        self.pump.stop()
        self.outbox.close()


if __name__ == "__main__":
    raise SystemExit(main())
