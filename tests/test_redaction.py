"""One redaction rule for secrets (issue 17, item 3): URL userinfo, secret-named keys and query
parameters, and the expansions of `${VAR}`s named like secrets, masked in the `config` reply, in events
and in the log. Before the fix the `config` reply carried the registry URL's credentials and a camera
URL's password, and the camera password went out in every `source.lost` event and log line."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from agent.util import redact
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import AgentProcess
from tests.helpers.models import save, unary_model
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import make_registry
from tests.helpers.waiting import wait_for
from tests.test_e2e_daemon import command, linear


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("rtsp://admin:hunter2@cam.local/stream", "rtsp://***@cam.local/stream"),
        ("cannot open http://u:p@10.0.0.2:8080/x.mjpg now", "cannot open http://***@10.0.0.2:8080/x.mjpg now"),
        ("https://token@registry.example/", "https://***@registry.example/"),
        ("http://cam/snap.jpg?user=a&password=pw1&x=1", "http://cam/snap.jpg?user=a&password=***&x=1"),
        ("http://cam/s?token=abc#frag", "http://cam/s?token=***#frag"),
        ("mqtt://broker:1883", "mqtt://broker:1883"),
        ("no url at all: user@example.org", "no url at all: user@example.org"),
    ],
)
def test_text_masks_url_credentials_and_secret_query_parameters(text: str, masked: str) -> None:
    assert redact.text(text) == masked


def test_doc_masks_secret_named_keys_and_remembered_values() -> None:
    redact.remember_expanded("http://cam/${CAM_TOKEN}/s", "device", {"CAM_TOKEN": "tok-7f3a9", "HOST": "cam"})
    redact.remember_expanded("${HOST}", "device", {"HOST": "camhost"})  # not named like a secret: kept
    doc = {
        "mqtt": {"password": "pw-123", "password_file": None, "username": "dev"},
        "registry": {"url": "https://u:tok@reg/", "api_key": "k-999"},
        "cams": [{"device": "http://cam/tok-7f3a9/s"}, {"device": "camhost"}],
    }
    assert redact.doc(doc) == {
        "mqtt": {"password": "***", "password_file": None, "username": "dev"},
        "registry": {"url": "https://***@reg/", "api_key": "***"},
        "cams": [{"device": "http://cam/***/s"}, {"device": "camhost"}],
    }


def test_the_log_filter_masks_messages_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redact.LogFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("cannot open %s", "rtsp://admin:hunter2@cam/stream")
        try:
            raise ValueError("bad url https://u:s3cret-x@reg/")
        except ValueError:
            logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "rtsp://***@cam/stream" in out and "https://***@reg/" in out, out
    assert "hunter2" not in out and "s3cret-x" not in out, out


CAM_PASSWORD = "cam-pw-51d2"
CAM_TOKEN = "cam-token-8e1b"
REG_TOKEN = "reg-token-c0ff"


@pytest.mark.slow
def test_no_secret_reaches_a_reply_an_event_or_the_log(tmp_path: Path, own_broker: Mosquitto) -> None:
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    model = save(unary_model("Relu", shape=(1, 3, 48, 64)), tmp_path / "relu.onnx")
    authed = registry.url.replace("http://", f"http://reader:{REG_TOKEN}@")
    agent = AgentProcess(tmp_path, "sec-1", "g", own_broker.url, authed, registry.public_key)
    profile = json.loads(agent.profile.read_text())
    camera = {"type": "camera", "width": 64, "height": 48, "reconnect_max": "1s"}
    profile["pipelines"] = [
        {  # a closed port: every attempt is a source.lost naming the URL
            "name": "gate",
            "model": str(model),
            "source": {**camera, "device": "http://admin:${CAM_PASSWORD}@127.0.0.1:9/video.mjpg"},
            "preprocess": {"resize": [64, 48]},
        },
        {  # a token in the path: only the remembered expansion of ${CAM_TOKEN} masks it
            "name": "yard",
            "model": str(model),
            "source": {**camera, "device": "http://127.0.0.1:9/${CAM_TOKEN}/video.mjpg"},
            "preprocess": {"resize": [64, 48]},
        },
    ]
    agent.profile.write_text(json.dumps(profile))
    sub = Subscriber(own_broker.port, "edge/sec-1/#")
    agent.start(env={"CAM_PASSWORD": CAM_PASSWORD, "CAM_TOKEN": CAM_TOKEN})
    try:
        lost = wait_for(
            lambda: (
                {e["pipeline"]: e for e in sub.payloads("edge/sec-1/events") if e["type"] == "source.lost"}.keys()
                >= {"gate", "yard"}
            ),
            60,
        )
        assert lost, agent.stderr()[-3000:]
        events = [e for e in sub.payloads("edge/sec-1/events") if e["type"] == "source.lost"]
        reasons = {e["pipeline"]: e["reason"] for e in events}
        assert "http://***@127.0.0.1:9/video.mjpg" in reasons["gate"], reasons
        assert "http://127.0.0.1:9/***/video.mjpg" in reasons["yard"], reasons
        assert wait_for(lambda: command_ok(sub), 30), agent.stderr()[-3000:]
        config = command(sub, "sec-1", "config")
        assert config["ok"], config
        assert config["result"]["registry"]["url"].startswith("http://***@127.0.0.1"), config["result"]["registry"]
        # Everything the agent published, and its whole log: no secret anywhere.
        published = b"".join(m.payload for m in sub.messages).decode(errors="replace")
        log = agent.stderr()
        assert "cannot open http://***@127.0.0.1:9/video.mjpg" in log, log[-3000:]
        for secret in (CAM_PASSWORD, CAM_TOKEN, REG_TOKEN):
            leaks = [m.topic for m in sub.messages if secret.encode() in m.payload]
            assert secret not in published, (secret, leaks)
            assert secret not in log, secret
        assert "Traceback" not in log, log[-3000:]
    finally:
        agent.stop()
        sub.close()
        registry.server.stop()


def command_ok(sub: Subscriber) -> bool:
    try:
        return bool(command(sub, "sec-1", "ping", timeout=1)["ok"])
    except IndexError:  # no reply yet: commands are subscribed after the pipelines start
        return False
