"""The demo's names (device, pipeline, model, channel, versions) and the profile its agent runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL = "text-detector"
SAMPLE = "ppocr-det"
DEVICE = "demo-01"
PIPELINE = "gate"
CHANNEL = "stable"
FIRST, SECOND = "1.0.0", "1.1.0"
TEXTS = ["EDGE AGENT", "GATE 42", "HELLO ONNX", "PLATE KX-4521", "DOCK 7", "EXIT"]


def write_profile(workdir: Path, registry_url: str, broker_port: int, http_port: int, *, mqtt_311: bool) -> Path:
    """workdir/profile.yaml for one agent on this machine (`mqtt_311`: the broker speaks MQTT 3.1.1 only)."""
    profile: dict[str, Any] = {
        "device": {"id": DEVICE, "group": "demo", "state_dir": str(workdir / "state")},
        # Probation watches a new version for a while and rolls it back when its inference p95 exceeds the
        # previous one's by a factor: the default 1.5 rolled the very same weights back on a 2-core machine
        # busy with other work, so the demo allows 2.5 (an int8 copy 3x slower is still rolled back).
        "registry": {
            "url": registry_url,
            "public_key": str(workdir / "keys" / "registry.pub"),
            "poll_interval": "2s",
            "probation": {"duration": "60s", "max_latency_ratio": 2.5},
        },
        # amqtt speaks MQTT 3.1.1 only, and answers an MQTT 5 CONNECT that has a Will with silence (no
        # CONNACK, socket left open), which the agent's `auto` cannot tell from a slow broker: pin 3.1.1.
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{broker_port}",
            "client_id": DEVICE,
            "protocol": "3.1.1" if mqtt_311 else "auto",
        },
        "runtime": {"providers": "auto", "threads": "auto", "http": f"127.0.0.1:{http_port}"},
        "health": {"interval": "2s"},
        "pipelines": [
            {
                "name": PIPELINE,
                "model": MODEL,
                "channel": CHANNEL,
                "source": {"type": "synthetic", "width": 640, "height": 480, "fps": 5, "text": TEXTS[:3]},
                "preprocess": {
                    "resize": [640, 480],
                    "color": "rgb",
                    "scale": 0.00392156862745098,
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                    "layout": "nchw",
                    "dtype": "float32",
                },
                "postprocess": {"type": "text-detection", "threshold": 0.3},
            }
        ],
    }
    path = workdir / "profile.yaml"
    path.write_text("# written by `edge-agent demo` (JSON is valid YAML)\n" + json.dumps(profile, indent=2) + "\n")
    return path
