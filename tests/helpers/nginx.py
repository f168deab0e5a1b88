"""nginx for tests: a real web server on a free loopback port, serving a registry folder with the
configuration docs/registry.md gives users, from a private prefix in a temporary folder.

Nothing of the system's nginx is used but its binary: the configuration, pid file, logs and temp folders
live in the test's folder, so it runs without root and beside a system nginx. The access log records
what the registry client asked for and what nginx answered (`Nginx.log()`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.broker import free_port

REPO = Path(__file__).resolve().parent.parent.parent
REGISTRY_DOC = REPO / "docs" / "registry.md"
START_TIMEOUT = 10.0


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def documented_locations() -> str:
    """The location blocks of the nginx example in docs/registry.md: what users are told to run."""
    block = REGISTRY_DOC.read_text().split("```nginx\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    assert lines[0].startswith("server {") and lines[-1] == "}", "docs/registry.md: the nginx example is one server"
    # Where it listens, its name, TLS and its root are the test's own; every rule about the files is the docs'.
    own = ("listen", "server_name", "ssl_", "root")
    return "\n".join(line for line in lines[1:-1] if not line.strip().startswith(own))


@dataclass(frozen=True)
class Request:
    """One line of the access log."""

    method: str
    path: str
    status: int
    range: str
    if_none_match: str
    bytes_sent: int


# One request per line: what was asked and what was answered (quoted fields may be empty: "-" or "").
LOG_FORMAT = '$request_method $uri $status "$http_range" "$http_if_none_match" $body_bytes_sent'
LOG_LINE = re.compile(r'^(\S+) (\S+) (\d{3}) "([^"]*)" "([^"]*)" (\d+)$')


class Nginx:
    """`nginx -p WORK` serving `root` on 127.0.0.1; `http_extra`/`server_extra` add directives to those blocks."""

    def __init__(self, root: Path, work: Path, *, http_extra: str = "", server_extra: str = "") -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (scripts/test.sh installs it with apt-get)")
        self.binary = binary
        self.root = root.resolve()
        self.work = work
        self.http_extra = http_extra
        self.server_extra = server_extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def config(self) -> str:
        built = subprocess.run([self.binary, "-V"], capture_output=True, text=True).stderr
        temp = "\n".join(
            f"    {kind}_temp_path {self.work / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            if kind == "client_body" or f"--http-{kind}-temp-path" in built
        )
        # As root the workers would switch to `nobody`, who cannot read pytest's folders.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}daemon off;
worker_processes 1;
pid {self.work / "nginx.pid"};
error_log {self.work / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    types {{ application/json json; application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    log_format registry '{LOG_FORMAT}';
    access_log {self.work / "access.log"} registry;
{temp}
{self.http_extra}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
{self.server_extra}
{documented_locations()}
    }}
}}
"""

    def start(self) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.work / "nginx.conf"
        conf.write_text(self.config())
        check = subprocess.run(
            [self.binary, "-t", "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its test configuration:\n{check.stderr}\n{conf.read_text()}")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited at start ({self.proc.returncode}): {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.port} within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def log(self) -> list[Request]:
        """Every request served so far, in order (nginx writes a line when a response is complete)."""
        path = self.work / "access.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            m = LOG_LINE.match(line)
            assert m, f"unexpected access log line: {line!r}"
            method, uri, status, rng, inm, sent = m.groups()
            # nginx writes an empty variable as "-", and a quote as \x22
            rng, inm = ("" if v == "-" else v.replace("\\x22", '"') for v in (rng, inm))
            out.append(Request(method, uri, int(status), rng, inm, int(sent)))
        return out

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
