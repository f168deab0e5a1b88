"""A real registry on loopback for tests: a folder, its keys, and the HTTP server in a thread.

The registry has signing roles (docs/trust.md): an offline root key (`root_key`; devices pin
`public_key`, its public half) signs keys/1.root.json, which names one online key (`key`) for
manifests, channels and orders. `make_registry(..., roles=False)` makes a single-key registry instead,
as earlier releases did (`public_key` is then the online key's public half).

Nothing here needs the onnx package: tiny models are written by `agent.device.onnxproto`, so the
registry tests also run under aarch64 emulation. Faults a test needs (a connection cut half way, a
stream that never ends) are injected by `FaultyHandler`; damaged files are made by editing the
registry folder, exactly as a broken mirror would serve them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.publish import publish, put_blob
from agent.cloud.roots import Change, current, first, following, install, sign_draft, write_draft
from agent.cloud.server import RegistryHandler, RegistryHTTPServer
from agent.cloud.writes import write_signed
from agent.device.onnxproto import AI_ONNX, identity_model
from agent.models.manifest import dumps, parse_manifest
from agent.models.registry import RegistryClient
from agent.models.signing import MANIFEST, generate_keypair, load_private_key, load_public_keys
from agent.models.store import Store
from agent.models.trust import ROLES, Root
from agent.transport.events import Event


class FaultyServer(RegistryHTTPServer):
    """The real server, with faults a test queues by file name: `faults[name]` is ("status", code),
    answered once, or ("cut", n), n bytes of the body and then a dropped connection; `endless[name]`
    serves that file over and over with no length; `trickle[name]` sends its body one byte every that
    many seconds (a server too slow to be of use, yet never silent long enough for a read timeout);
    `trickle_head[name]` does the same to its status line and headers, before any Content-Length."""

    def __init__(self, root: Path, throttle_bps: float | None = None) -> None:
        self.faults: dict[str, tuple[str, int]] = {}
        self.endless: dict[str, bool] = {}
        self.trickle: dict[str, float] = {}
        self.trickle_head: dict[str, float] = {}
        super().__init__(root, throttle_bps=throttle_bps, handler=FaultyHandler)


class FaultyHandler(RegistryHandler):
    """Serves like the real server, except for the faults queued on it."""

    server: FaultyServer

    def send_body(self, path: Path, start: int, end: int) -> None:
        every = self.server.trickle.get(path.name)
        if every is not None:
            data = path.read_bytes()[start : end + 1]
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(every)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        fault = self.server.faults.pop(path.name, None)
        if fault is None:
            return super().send_body(path, start, end)
        kind, arg = fault
        if kind == "cut":  # send `arg` bytes of the body, then drop the connection
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(arg))
            self.wfile.flush()
            self.close_connection = True

    def _serve(self, body: bool) -> None:
        path = self.resolve()
        fault = self.server.faults.get(path.name) if path is not None else None
        if path is not None and fault is not None and fault[0] == "status":  # once, e.g. a 503 from a busy CDN
            del self.server.faults[path.name]
            self.server.record(self)
            self._status_only(fault[1])
            return
        every = self.server.trickle_head.get(path.name) if path is not None else None
        if every is not None and path is not None and path.is_file():
            self.server.record(self)
            data = path.read_bytes() if body else b""
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {path.stat().st_size}\r\n\r\n"
            self.close_connection = True
            try:
                for i in range(len(head)):
                    self.wfile.write(head[i : i + 1].encode())
                    self.wfile.flush()
                    time.sleep(every)
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if body and path is not None and self.server.endless.get(path.name):
            self.server.record(self)
            # No Content-Length: the body ends when the connection does, which it never does here.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            data = path.read_bytes()
            try:
                for _ in range(64):
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        super()._serve(body)


@dataclass
class Registry:
    root: Path
    key: Path
    public_key: Path
    server: FaultyServer
    tmp: Path
    root_key: Path | None = None  # None: a single-key registry
    published: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def tiny(
        self, name: str, opset: int = 13, ir: int = 8, extra: dict[str, int] | None = None, doc: bytes = b""
    ) -> Path:
        path = self.tmp / "models" / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(identity_model(ir, {AI_ONNX: opset, **(extra or {})}, doc=doc))
        return path

    def publish(self, model: str, version: str, file: Path, channel: str | None = "stable", **kwargs: Any) -> Any:
        result = publish(self.root, model, version, file, self.key, channel=channel, **kwargs)
        self.published.append((model, version))
        return result

    def next_root(self, change: Change, *signers: Path) -> Root:
        """Root version N+1 with `change`, signed by `signers` (default: the root key) and installed."""
        cur = current(self.root)
        assert cur is not None, "a single-key registry has no root"
        return self.install_root(following(cur, change), *signers)

    def install_root(self, root: Root, *signers: Path) -> Root:
        """Draft, sign (offline, as `registry keys sign` does) and install `root`."""
        drafts = self.tmp / "drafts"
        draft = write_draft(root, drafts)
        for key in signers or ((self.root_key,) if self.root_key else ()):
            sign_draft(draft, load_private_key(key))
        return install(self.root, draft)

    def manifest_path(self, model: str, version: str) -> Path:
        return self.root / "models" / model / version / "manifest.json"

    def resign(
        self, model: str, version: str, mutate: Callable[[dict[str, Any]], None], key: Path | None = None
    ) -> None:
        """Edit a manifest as a dict and sign it again (a validly signed but bad manifest)."""
        path = self.manifest_path(model, version)
        doc = json.loads(path.read_bytes())
        mutate(doc)
        write_signed(path, dumps(doc), load_private_key(key or self.key), MANIFEST)

    def put(self, data: bytes) -> dict[str, Any]:
        blob = put_blob(self.root, data)
        return {"digest": blob.digest, "size": blob.size}

    def blob_path(self, model: str, version: str, variant: int = 0) -> Path:
        manifest = parse_manifest(self.manifest_path(model, version).read_bytes())
        return self.root / "blobs" / "sha256" / manifest.variants[variant].blob.hex

    def blob_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.server.requests if str(r["path"]).startswith("/blobs/")]

    def client(self, state_dir: Path, events: list[Event] | None = None, **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("retries", 1)
        kwargs.setdefault("backoff", 0.01)
        kwargs.setdefault("providers", ("CPUExecutionProvider",))
        return RegistryClient(
            self.url,
            self.public_key,
            Store(state_dir, keep_versions=kwargs.pop("keep", 3)),
            emit=(events.append if events is not None else (lambda e: None)),
            **kwargs,
        )


def make_registry(tmp: Path, throttle_bps: float | None = None, roles: bool = True) -> Registry:
    keys = tmp / "keys"
    private, public = generate_keypair(keys)
    (tmp / "registry").mkdir(exist_ok=True)
    server = FaultyServer(tmp / "registry", throttle_bps=throttle_bps)
    server.start()
    if not roles:
        return Registry(tmp / "registry", private, public, server, tmp)
    root_private, root_public = generate_keypair(tmp / "offline", "root")
    registry = Registry(tmp / "registry", private, root_public, server, tmp, root_key=root_private)
    online = load_public_keys(public)
    # A century: tests that move the clock years ahead test what they name, not the root's expiry.
    century = timedelta(days=36500)
    roots = load_public_keys(root_public)
    registry.install_root(first(roots, 1, dict.fromkeys(ROLES, online), expires=century, key_expires=century))
    return registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An empty registry served on a free loopback port, with its own key pair."""
    reg = make_registry(tmp_path)
    yield reg
    reg.server.stop()


def start_cli_server(root: Path, *extra: str, cwd: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    """`edge-agent registry serve --port 0` in a subprocess; returns it and the URL it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "--log-level",
            "warning",
            "registry",
            "serve",
            "--root",
            str(root),
            "--port",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = proc.stdout.readline()
    if not line.startswith("serving ") or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"registry serve did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.split()[-1]
