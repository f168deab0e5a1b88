"""The docs stay true: every shell block marked runnable in docs/*.md and README.md is run, in order.

Convention (documented in docs/README.md):

- A fenced block whose info string is `sh runnable` (or `bash runnable`) is run by this test. Extra words
  tune it: `timeout=SECONDS` (default 60), `cwd=repo` (run in the repository root instead of the
  temporary folder; such a block must not write there).
- A fenced block of any language with `file=NAME` (e.g. `yaml file=profile.yaml`) is written to NAME
  in the temporary folder when the runner reaches it, so the runnable blocks after it can use it.
- Blocks without these words are left alone (systemd, a real camera, a GPU, another host).

Each document gets a fresh temporary working folder, its blocks run in document order with
`bash -e` (no pipefail: `cmd 2>&1 | grep -F 'message'` asserts a failing command's message), each in
its own process group, which is killed when the block ends. Files persist from block to block,
shell variables do not. What blocks find in the environment:

    EDGE_BROKER          mqtt://127.0.0.1:PORT, a real Mosquitto (anonymous)
    EDGE_BROKER_AUTH     mqtt://127.0.0.1:PORT, a Mosquitto that wants a password
    EDGE_BROKER_USER     the user it knows (gate-cam-01), whose password is in EDGE_BROKER_PASSWORD_FILE
    EDGE_REGISTRY        http://127.0.0.1:PORT/, `edge-agent registry serve` of EDGE_REGISTRY_ROOT
    EDGE_REGISTRY_ROOT   ./registry in the working folder (empty at the start of each document)
    EDGE_SAMPLE_MODEL    the real PP-OCRv4 text detector (agent.cloud.samples, 'ppocr-det')
    EDGE_SAMPLES         the folder of every sample model (ppocr-det.onnx, silero-vad.onnx, ...)
    EDGE_REPO            the repository root
    EDGE_DOCS_TEST=1; HOME is a temporary folder; PATH starts with the virtualenv's bin (edge-agent, python)

A failing block is reported with its file and line, the block, its exit status and its output.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
RUNNABLE_LANGS = {"sh", "bash", "shell"}
KNOWN_ATTRS = {"runnable", "timeout", "file", "cwd"}
DEFAULT_TIMEOUT = 60.0
AUTH_USER, AUTH_PASSWORD = "gate-cam-01", "s3cret-gate"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    attrs: dict[str, str]
    body: str
    words: list[str] = field(default_factory=list)
    end: int = 0  # 1-based line of the closing fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return "runnable" in self.attrs and self.lang in RUNNABLE_LANGS

    @property
    def timeout(self) -> float:
        return float(self.attrs.get("timeout", DEFAULT_TIMEOUT))


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks (CommonMark: ``` or ~~~, closed by the same character, at least as long)."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence, indent, info = m.group("fence"), len(m.group("indent")), m.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if (
                close
                and close.group("fence")[0] == fence[0]
                and len(close.group("fence")) >= len(fence)
                and not close.group("info").strip()
            ):
                break
            text = lines[i]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            i += 1
        i += 1
        words = info.split()
        attrs: dict[str, str] = {}
        for word in words[1:]:
            key, _, value = word.partition("=")
            attrs[key] = value
        blocks.append(Block(path, start + 1, words[0] if words else "", attrs, "\n".join(body) + "\n", words, end=i))
    return blocks


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [REPO / "README.md"]


def files_with_runnable_blocks() -> list[Path]:
    return [p for p in doc_files() if any(b.runnable for b in parse_blocks(p))]


# ---------------------------------------------------------------------------------------------------
# Fixtures: a broker that wants a password, a registry server per document, the environment


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, Path]]:
    work = tmp_path_factory.mktemp("docs-auth-broker")
    passwd = work / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), AUTH_USER, AUTH_PASSWORD], check=True, capture_output=True
    )
    password_file = work / "password"
    password_file.write_text(AUTH_PASSWORD)
    stay_root = (
        "user root\n" if os.geteuid() == 0 else ""
    )  # mosquitto as root drops to a user who cannot read pytest's tmp
    mosq = Mosquitto(work / "mosquitto", extra_conf=f"{stay_root}password_file {passwd}\n", anonymous=False).start()
    yield mosq, password_file
    mosq.stop()


@pytest.fixture(scope="module")
def samples() -> dict[str, Path]:
    from agent.cloud.samples import SAMPLES, sample_model

    return {name: sample_model(name, quiet=True) for name in SAMPLES}


def start_registry(root: Path, cwd: Path) -> tuple[subprocess.Popen[str], str]:
    from tests.helpers.registry import start_cli_server

    return start_cli_server(root, cwd=cwd)


def block_env(
    work: Path, broker: Mosquitto, auth: tuple[Mosquitto, Path], registry_url: str, samples: dict[str, Path]
) -> dict[str, str]:
    from agent.cloud.samples import cache_dir

    home = work.parent / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "PYTEST_"))}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "EDGE_AGENT_CACHE": str(cache_dir().parent),  # sample models stay where they were fetched
            "EDGE_BROKER": broker.url,
            "EDGE_BROKER_AUTH": auth[0].url,
            "EDGE_BROKER_USER": AUTH_USER,
            "EDGE_BROKER_PASSWORD_FILE": str(auth[1]),
            "EDGE_REGISTRY": registry_url,
            "EDGE_REGISTRY_ROOT": str(work / "registry"),
            "EDGE_SAMPLE_MODEL": str(samples["ppocr-det"]),
            "EDGE_SAMPLES": str(samples["ppocr-det"].parent),
            "EDGE_REPO": str(REPO),
            "EDGE_DOCS_TEST": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the block's shell and everything it started (background servers, agents)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # until the group is empty (its members exited and were reaped)
            if proc.poll() is None:
                time.sleep(0.02)
                continue
            if not group_alive(proc.pid):
                return
            time.sleep(0.02)
    proc.wait(5)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies waiting for a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def run_block(block: Block, work: Path, env: dict[str, str], index: int) -> None:
    script = work.parent / "blocks" / f"{index:02d}-line{block.line}.sh"
    script.parent.mkdir(exist_ok=True)
    script.write_text(block.body)
    log = script.with_suffix(".out")
    cwd = REPO if block.attrs.get("cwd") == "repo" else work
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-e", str(script)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(block.timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_group(proc)
    took = time.monotonic() - started
    print(f"{block.where}: {'ok' if rc == 0 else 'FAILED'} in {took:.1f}s")  # shown with pytest -s or -rP
    if rc == 0:
        return
    output = log.read_text(errors="replace").splitlines()
    tail = "\n".join(output[-60:]) or "(no output)"
    status = f"timed out after {block.timeout:g}s" if rc is None else f"exit status {rc} after {took:.1f}s"
    pytest.fail(
        f"{block.where}: runnable block failed ({status}), run in {cwd}\n"
        f"--- block ---\n{block.body}--- output{' (last 60 lines)' if len(output) > 60 else ''} ---\n{tail}",
        pytrace=False,
    )


@pytest.mark.parametrize("doc", files_with_runnable_blocks(), ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks(
    doc: Path, tmp_path: Path, broker: Mosquitto, auth_broker: tuple[Mosquitto, Path], samples: dict[str, Path]
) -> None:
    work = tmp_path / "work"
    (work / "registry").mkdir(parents=True)
    server, url = start_registry(work / "registry", cwd=work)
    try:
        env = block_env(work, broker, auth_broker, url, samples)
        index = 0
        for block in parse_blocks(doc):
            if "file" in block.attrs:
                target = work / block.attrs["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.body)
            if block.runnable:
                index += 1
                run_block(block, work, env, index)
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


# ---------------------------------------------------------------------------------------------------
# The rules around the blocks


def test_block_attributes_are_known() -> None:
    """A typo (`sh runable`, `timeout:30`) would silently turn a checked block into an unchecked one."""
    problems = []
    for doc in doc_files():
        for block in parse_blocks(doc):
            unknown = [w for w in block.words[1:] if w.partition("=")[0] not in KNOWN_ATTRS]
            if unknown:
                problems.append(
                    f"{block.where}: unknown word(s) in the info string: {' '.join(unknown)} "
                    f"(known: runnable, timeout=SECONDS, file=NAME, cwd=repo)"
                )
            if "runnable" in block.attrs and block.lang not in RUNNABLE_LANGS:
                problems.append(
                    f"{block.where}: only sh/bash blocks can be runnable, not {block.lang or 'a block without language'}"
                )
            if "timeout" in block.attrs and not re.fullmatch(r"\d+(\.\d+)?", block.attrs["timeout"]):
                problems.append(f"{block.where}: timeout must be a number of seconds")
            if "cwd" in block.attrs and block.attrs["cwd"] != "repo":
                problems.append(f"{block.where}: cwd can only be repo")
            if "file" in block.attrs and (
                not block.attrs["file"] or block.attrs["file"].startswith("/") or ".." in block.attrs["file"]
            ):
                problems.append(f"{block.where}: file= must be a relative path inside the working folder")
    assert not problems, "\n".join(problems)


def test_parser_finds_blocks_as_commonmark_does(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n\n```sh runnable timeout=5\necho one\n```\n\n- item\n  ```yaml file=a.yaml\n  k: v\n  ```\n"
        "~~~~\n```sh runnable\nnot a block\n```\n~~~~\n````sh\n```\ninner\n````\n"
    )
    blocks = parse_blocks(doc)
    assert [(b.line, b.lang, b.attrs) for b in blocks] == [
        (3, "sh", {"runnable": "", "timeout": "5"}),
        (8, "yaml", {"file": "a.yaml"}),
        (11, "", {}),
        (16, "sh", {}),
    ]
    assert blocks[0].body == "echo one\n" and blocks[0].timeout == 5.0 and blocks[0].runnable
    assert blocks[1].body == "k: v\n"
    assert "not a block" in blocks[2].body and "inner" in blocks[3].body


def test_a_failing_block_reports_file_line_and_output(tmp_path: Path) -> None:
    doc = REPO / "docs" / "x.md"  # only for the relative name in the report
    block = Block(doc, 12, "sh", {"runnable": ""}, "echo before\nfalse\necho after\n")
    (tmp_path / "work").mkdir()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_block(block, tmp_path / "work", dict(os.environ), 1)
    text = str(failed.value)
    assert "docs/x.md:12: runnable block failed (exit status 1" in text
    assert "before" in text and "after" not in text.split("--- output")[1]


def test_a_block_that_hangs_is_stopped_with_its_children(tmp_path: Path) -> None:
    block = Block(
        REPO / "docs" / "x.md",
        3,
        "sh",
        {"runnable": "", "timeout": "1"},
        "sleep 300 &\necho $! > child.pid\nsleep 300\n",
    )
    (tmp_path / "work").mkdir()
    with pytest.raises(pytest.fail.Exception, match="timed out after 1s"):
        run_block(block, tmp_path / "work", dict(os.environ), 1)
    child = int((tmp_path / "work" / "child.pid").read_text())
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", (
        "the block's background child survived"
    )


def test_every_doc_is_in_the_index() -> None:
    index = (DOCS / "README.md").read_text()
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and f"]({p.name})" not in index]
    assert not missing, f"docs/README.md does not link {', '.join(missing)}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for doc in doc_files():
        fenced = {n for b in parse_blocks(doc) for n in range(b.line, b.end + 1)}
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if number in fenced:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue
                path = target.split("#", 1)[0]
                if path and not (doc.parent / path).exists():
                    broken.append(f"{doc.relative_to(REPO)}:{number}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_profile_reference_is_generated_from_the_current_schema() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_profile_reference", REPO / "scripts" / "gen-profile-reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render()
    current = (DOCS / "profile-reference.md").read_text()
    assert current == expected, (
        "docs/profile-reference.md is stale: run .venv/bin/python scripts/gen-profile-reference.py"
    )


def test_profile_reference_names_every_key_of_the_schema() -> None:
    from agent.config.profile import profile_schema

    schema = profile_schema()
    text = (DOCS / "profile-reference.md").read_text()
    missing = [
        f"{name}.{key}"
        for name, obj in schema["$defs"].items()
        for key in obj.get("properties", {})
        if key != "type" and f"| `{key}` |" not in text
    ]
    missing += [k for k in schema["properties"] if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from docs/profile-reference.md: {missing}"


def test_mosquitto_is_there() -> None:
    assert shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists(), (
        "the docs test needs Mosquitto (scripts/test.sh installs it)"
    )
