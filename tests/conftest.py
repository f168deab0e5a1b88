"""Fixtures every test area shares: a real Mosquitto, tiny generated models, real sample models."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers.broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent


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
