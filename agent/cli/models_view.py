"""`edge-agent models inspect FILE|MODEL --view`: the model's graph in Netron, served on a loopback port.

Netron is the viewer the ONNX world uses; it ships in the `cloud` extra (a workstation's tool, never a
device dependency) and is imported only here, when asked for.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path

from agent.cli.errors import FAILURE, USAGE, CliError

LOOPBACK = "127.0.0.1"  # the graph holds the model's weights: never served beyond this machine


def view(path: Path, port: int, browser: bool) -> int:
    """Serve `path` in Netron until Ctrl-C; print the URL (and open it when `browser`)."""
    try:
        import netron
    except ImportError:
        raise CliError(
            "--view needs Netron, which comes with the cloud extra: pip install 'edge-agent[cloud]' (or pip install netron)",
            FAILURE,
        ) from None
    try:
        host, bound = netron.start(str(path), address=(LOOPBACK, port), browse=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"--view: Netron could not listen on {LOOPBACK}:{port}: {exc}", USAGE) from None
    url = f"http://{host}:{bound}/"
    print(f"Netron shows {path.name} at {url} (Ctrl-C stops it)", flush=True)
    if browser:
        webbrowser.open(url)
    netron.wait()  # returns on Ctrl-C (SIGINT), having stopped the server
    return 0
