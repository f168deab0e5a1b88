"""The daemon: wires the parts, answers commands, reports health, talks to systemd, serves the status page."""
