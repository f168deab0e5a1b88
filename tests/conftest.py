"""Fixtures every test area shares: a real Mosquitto, tiny generated models, real sample models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import VIOLATIONS

REPO = Path(__file__).resolve().parent.parent
# Fixtures defined beside their helpers, shared by every test module.
pytest_plugins = ["tests.helpers.registry"]


class _SwallowedExceptions(logging.Handler):
    """Keeps every record under `agent` that carries a traceback at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_swallowed_exceptions(request: pytest.FixtureRequest) -> Iterator[None]:
    """An exception that code under `agent` caught and logged fails the test that caused it.

    Callbacks and worker threads must not die, so they catch and log; without this a bug there would
    pass every test. A test that provokes such a log on purpose says so with
    `@pytest.mark.logs_exception("why")`.
    """
    handler = _SwallowedExceptions()
    logger = logging.getLogger("agent")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.records and request.node.get_closest_marker("logs_exception") is None:
        lines = [f"{r.name}: {r.getMessage()} ({r.exc_info[1]!r})" for r in handler.records if r.exc_info]
        pytest.fail("code under agent logged an exception it swallowed:\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(autouse=True)
def fail_on_contract_violations() -> Iterator[None]:
    """No event, health, status or reply that a test saw on the wire breaks the contract.

    In the test's own process an event that does not match cannot be made (ContractError); what
    subprocess agents publish is checked by the test subscribers (tests/helpers/mqtt_client.py), which
    every real agent of tests/helpers/daemon_proc.py has, and collected here.
    """
    VIOLATIONS.take()  # late messages of an earlier test's agents are not this test's
    yield
    found = VIOLATIONS.take()
    if found:
        pytest.fail("messages that break the wire contract:\n" + "\n".join(found), pytrace=False)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the whole run; tests use their own topics. Do not kill this one."""
    mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker for this test alone, which it may kill -9 and restart on the same port."""
    mosq = Mosquitto(tmp_path / "mosquitto").start()
    yield mosq
    mosq.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Brokers with extra configuration (TLS listeners, ACLs, passwords); all stopped after the test."""
    started: list[Mosquitto] = []

    def make(extra_conf: str = "", anonymous: bool = True, start: bool = True) -> Mosquitto:
        mosq = Mosquitto(tmp_path / f"mosquitto{len(started)}", extra_conf=extra_conf, anonymous=anonymous)
        started.append(mosq)
        return mosq.start() if start else mosq

    yield make
    for mosq in started:
        mosq.stop()


@pytest.fixture(scope="session")
def sample_model() -> Callable[[str], Path]:
    """Real pretrained models from pinned, sha256-checked wheels (ppocr-det, silero-vad, ...)."""
    from agent.cloud.samples import sample_model as fetch

    return lambda name: fetch(name, quiet=True)
