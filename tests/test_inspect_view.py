"""`edge-agent models inspect FILE --view`: Netron's server started on loopback and answering for the model."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from agent.cli import main
from tests.helpers.daemon_proc import REPO
from tests.helpers.models import linear_model, save


def test_view_serves_the_graph_in_netron_until_ctrl_c(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 2), np.float32)), tmp_path / "lin.onnx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "models", "inspect", str(model), "--view", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("Netron shows") or not line:
                break
        assert lines[0].startswith("lin.onnx: ")  # the summary comes first, as without --view
        match = re.match(r"Netron shows lin\.onnx at (http://127\.0\.0\.1:(\d+)/) \(Ctrl-C stops it\)", lines[-1])
        assert match, lines
        url = match.group(1)
        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and '<meta name="file" content="/data/lin.onnx">' in page.text
        data = requests.get(url + "data/lin.onnx", timeout=10)
        assert data.status_code == 200 and data.content == model.read_bytes()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_view_without_netron_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(linear_model(np.ones((3, 2), np.float32)), tmp_path / "lin.onnx")
    monkeypatch.setitem(sys.modules, "netron", None)  # `import netron` raises ImportError, as when not installed
    assert main(["models", "inspect", str(model), "--view", "--no-browser"]) == 1
    err = capsys.readouterr().err
    assert "--view needs Netron, which comes with the cloud extra: pip install 'edge-agent[cloud]'" in err
    assert "Traceback" not in err
