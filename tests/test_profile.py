"""The device profile: typed loading, defaults, units, secrets, and one located message per mistake."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config.base import plain
from agent.config.profile import Profile, ProfileError, load_profile
from agent.config.units import format_duration, format_size, parse_duration, parse_size
from agent.models.signing import generate_keypair

pytestmark = pytest.mark.arm64

GOOD = """\
device: {id: cam-01, group: north, state_dir: state}
registry: {url: "http://127.0.0.1:8780", public_key: keys/registry.pub}
mqtt: {url: "mqtt://127.0.0.1:1883"}
pipelines:
  - name: gate
    model: text-detector
    source: {type: synthetic}
"""


def write(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ProfileError) as info:
        load_profile(write(tmp_path, text), environ=environ or {})
    return [str(i).replace(str(tmp_path) + "/", "") for i in info.value.issues]


def test_good_profile_is_typed_with_defaults(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD), environ={})
    assert isinstance(profile, Profile)
    assert profile.device.state_dir == tmp_path / "state"  # relative to the profile's folder
    assert profile.registry is not None and profile.registry.url == "http://127.0.0.1:8780/"
    assert profile.registry.public_key == tmp_path / "keys/registry.pub"
    assert profile.registry.poll_interval == 300.0
    assert profile.mqtt is not None and (profile.mqtt.host, profile.mqtt.port) == ("127.0.0.1", 1883)
    assert profile.mqtt.topic_prefix == "edge" and profile.mqtt.qos == 1
    assert profile.mqtt.outbox.max_bytes == 256 * 1024**2 and profile.mqtt.outbox.max_age == 7 * 86400
    assert profile.runtime.providers == "auto" and profile.runtime.threads == "auto"
    assert profile.health.interval == 30.0
    (pipe,) = profile.pipelines
    assert pipe.source.type == "synthetic" and pipe.source.fps == 10.0
    assert pipe.postprocess.type == "raw" and pipe.preprocess.layout == "nchw"
    assert not pipe.model_is_file


def test_profile_objects_are_immutable(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD), environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.device.id = "other"  # type: ignore[misc]


def test_json_is_valid_yaml_too(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"device": {"id": "j1"}, "pipelines": [{"name": "p", "model": "m.onnx", '
        '"source": {"type": "csv", "path": "x.csv"}}]}',
        "profile.json",
    )
    profile = load_profile(path, environ={})
    assert profile.pipelines[0].source.path == tmp_path / "x.csv"
    assert profile.pipelines[0].model_is_file


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5min", 300),
        ("2h", 7200),
        ("7d", 604800),
        (15, 15),
        ("1.5s", 1.5),
        ("10", 10),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 1024**2),
        ("1GB", 10**9),
        ("512kib", 512 * 1024),
        (4096, 4096),
        ("2 GiB", 2 * 1024**3),
        ("100B", 100),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_units_format_back() -> None:
    assert format_duration(300) == "5min" and format_duration(0.25) == "250ms" and format_duration(86400) == "1d"
    assert format_size(256 * 1024**2) == "256MiB" and format_size(1000) == "1000B"


def test_provider_aliases_and_options(tmp_path: Path) -> None:
    profile = load_profile(
        write(
            tmp_path,
            """\
        device: {id: d}
        runtime:
          providers: [{tensorrt: {trt_fp16_enable: true}}, {cuda: {device_id: 1}}, CPUExecutionProvider, openvino]
          threads: 2
        """,
        ),
        environ={},
    )
    names = [p.name for p in profile.runtime.providers]
    assert names == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
        "OpenVINOExecutionProvider",
    ]
    assert profile.runtime.providers[1].options == {"device_id": 1}
    assert profile.runtime.threads == 2


def test_env_expansion_with_default(tmp_path: Path) -> None:
    profile = load_profile(
        write(
            tmp_path,
            """\
        device: {id: "${DEV_ID}", state_dir: "${STATE:-/var/tmp/ea}"}
        mqtt: {url: "mqtt://localhost", username: u, password: "${MQTT_PW}"}
        """,
        ),
        environ={"DEV_ID": "env-dev", "MQTT_PW": "hunter2"},
    )
    assert profile.device.id == "env-dev"
    assert profile.device.state_dir == Path("/var/tmp/ea")
    assert profile.mqtt is not None and profile.mqtt.secret() == "hunter2"
    assert "hunter2" not in repr(profile) and "hunter2" not in str(plain(profile))


def test_password_file_is_read_when_needed(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    profile = load_profile(
        write(
            tmp_path,
            """\
        device: {id: d}
        mqtt: {url: "mqtt://localhost", username: u, password_file: pw}
        """,
        ),
        environ={},
    )
    assert profile.mqtt is not None and profile.mqtt.secret() == "s3cret"


def test_secrets_are_never_echoed_in_errors(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """\
        device: {id: d}
        mqtt: {url: "mqtt://localhost", password: ["hunter2"]}
        pipelines: []
        """,
    )
    assert errors == ["profile.yaml:2: mqtt.password: expected a string, got <redacted>"]
    errors = errors_of(
        tmp_path,
        """\
        device: {id: d}
        health: {interval: "${SECRET_INTERVAL}"}
        """,
        environ={"SECRET_INTERVAL": "topsecret"},
    )
    assert errors == ["profile.yaml:2: health.interval: expected a duration like 30s or 5min, got <redacted>"]


# Each bad profile, and the exact located message a user sees.
BAD_CASES = [
    pytest.param(
        "device: {id: d}\nmqt: {url: mqtt://x}\n",
        ["profile.yaml:2: mqt: unknown key (did you mean 'mqtt'?)"],
        id="unknown-top-key",
    ),
    pytest.param(
        "device: {id: d}\nruntime: {provders: auto}\n",
        ["profile.yaml:2: runtime.provders: unknown key (did you mean 'providers'?)"],
        id="unknown-nested-key",
    ),
    pytest.param(
        "device: {id: d}\nhealth: {every: 5s}\n",
        ["profile.yaml:2: health.every: unknown key; expected one of: interval, stuck_after"],
        id="unknown-key-no-close-match",
    ),
    pytest.param(
        "device: {group: g}\n",
        [
            "profile.yaml:1: device.id: required key missing: this device's name in topics and the fleet (letters, digits, _ . -)"
        ],
        id="missing-device-id",
    ),
    pytest.param(
        "pipelines: []\n", ["profile.yaml:1: device: required key missing: who this device is"], id="missing-device"
    ),
    pytest.param(
        "device: {id: 'cam 01'}\n",
        [
            "profile.yaml:1: device.id: expected a name of letters, digits, '_', '.' and '-' (up to 64, starting with a "
            "letter or digit), got 'cam 01'"
        ],
        id="device-id-with-space",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic, fps: fast}\n",
        ["profile.yaml:5: pipelines[0].source.fps: expected a number > 0, got 'fast'"],
        id="fps-not-a-number",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic, fps: 0}\n",
        ["profile.yaml:5: pipelines[0].source.fps: expected a number > 0, got 0"],
        id="fps-zero",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: camera}\n",
        [
            "profile.yaml:5: pipelines[0].source.device: required key missing: a V4L2 device path (/dev/video0), "
            "a device index (0), or a stream URL (rtsp://, http://)"
        ],
        id="camera-without-device",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: cam}\n",
        [
            "profile.yaml:5: pipelines[0].source.type: expected one of camera, video, images, synthetic, csv, jsonl, "
            "serial, iio, mqtt, audio, got 'cam' (did you mean 'camera'?)"
        ],
        id="unknown-source-type",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {fps: 3}\n",
        [
            "profile.yaml:5: pipelines[0].source.type: required key missing: expected one of camera, video, images, "
            "synthetic, csv, jsonl, serial, iio, mqtt, audio"
        ],
        id="source-without-type",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n"
        "    postprocess: {type: text-detection, threshold: 2}\n",
        ["profile.yaml:6: pipelines[0].postprocess.threshold: expected a number > 0 and < 1, got 2"],
        id="threshold-out-of-range",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n"
        "    postprocess: {type: detect}\n",
        [
            "profile.yaml:6: pipelines[0].postprocess.type: expected one of raw, classification, detection, "
            "text-detection, threshold, anomaly, got 'detect' (did you mean 'detection'?)"
        ],
        id="unknown-postprocess",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - {name: a, model: m.onnx, source: {type: synthetic}}\n"
        "  - {name: a, model: n.onnx, source: {type: synthetic}}\n",
        ["profile.yaml:4: pipelines[1].name: two pipelines are named 'a'; names must be unique"],
        id="duplicate-pipeline-names",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - {name: a, model: detector, source: {type: synthetic}}\n",
        [
            "profile.yaml:3: pipelines[0].model: pipeline 'a': model 'detector' is a registry name, but the profile "
            "has no registry section (give a path to an .onnx file, or add registry)"
        ],
        id="registry-model-without-registry",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtts://broker:8883'}\n",
        [
            "profile.yaml:2: mqtt.url: url is mqtts:// but tls.ca is not set; give the CA that signed the broker's certificate"
        ],
        id="mqtts-without-ca",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtt://broker', tls: {ca: ca.pem}}\n",
        ["profile.yaml:2: mqtt.tls: tls is set but url is mqtt://; use mqtts:// to connect with TLS"],
        id="tls-on-plain-url",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'http://broker'}\n",
        ["profile.yaml:2: mqtt.url: expected mqtt://host[:port] or mqtts://host[:port], got 'http://broker'"],
        id="mqtt-bad-scheme",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtt://broker:99999'}\n",
        ["profile.yaml:2: mqtt.url: the port in 'mqtt://broker:99999' is not a number from 1 to 65535"],
        id="mqtt-bad-port",
    ),
    pytest.param(
        "device: {id: d}\nmqtt:\n  url: 'mqtts://b'\n  tls: {ca: ca.pem, cert: c.pem}\n",
        ["profile.yaml:4: mqtt.tls: cert and key go together: set both for mutual TLS, or neither"],
        id="cert-without-key",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtt://b', outbox: {max_bytes: lots}}\n",
        ["profile.yaml:2: mqtt.outbox.max_bytes: expected a size like 64MiB or 1GB, got 'lots'"],
        id="bad-size",
    ),
    pytest.param(
        "device: {id: d}\nhealth: {interval: soon}\n",
        ["profile.yaml:2: health.interval: expected a duration like 30s or 5min, got 'soon'"],
        id="bad-duration",
    ),
    pytest.param(
        "device: {id: d}\nruntime: {providers: [cuda, cpux]}\n",
        ["profile.yaml:2: runtime.providers[1]: unknown execution provider 'cpux' (did you mean 'cpu'?)"],
        id="unknown-provider",
    ),
    pytest.param(
        "device: {id: d}\nruntime: {threads: 0}\n",
        ["profile.yaml:2: runtime.threads: expected auto or a number > 0, got 0"],
        id="zero-threads",
    ),
    pytest.param(
        "device: {id: d}\nruntime: {providers: []}\n",
        ["profile.yaml:2: runtime.providers: expected auto or a list of at least one provider, got an empty list"],
        id="empty-provider-list",
    ),
    pytest.param(
        "device: {id: d}\nruntime: {autotune: maybe}\n",
        ["profile.yaml:2: runtime.autotune: expected true or false, got 'maybe'"],
        id="bad-bool",
    ),
    pytest.param(
        "device: {id: d}\nregistry: {url: 'ftp://models', public_key: k.pub}\n",
        ["profile.yaml:2: registry.url: expected an http:// or https:// URL, got 'ftp://models'"],
        id="registry-bad-url",
    ),
    pytest.param(
        "device: {id: d}\nregistry: {url: 'https://models'}\n",
        [
            "profile.yaml:2: registry.public_key: required key missing: the registry's root public key(s) (PEM), pinned at "
            "install (docs/trust.md); for a registry without signing roles, the key that signs manifests"
        ],
        id="registry-without-key",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtt://b', password: x, password_file: pw}\n",
        ["profile.yaml:2: mqtt.password: password and password_file are both set; keep one"],
        id="two-passwords",
    ),
    pytest.param(
        "device: {id: d}\nmqtt: {url: 'mqtt://b', qos: 2}\n",
        ["profile.yaml:2: mqtt.qos: expected one of 0, 1, got 2"],
        id="qos-2",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n"
        "    preprocess: {color: rgb, mean: [0.5, 0.5]}\n",
        ["profile.yaml:6: pipelines[0].preprocess: mean has 2 values but color rgb has 3 channel(s)"],
        id="mean-length",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n"
        "    preprocess: {layout: nwhc}\n",
        ["profile.yaml:6: pipelines[0].preprocess.layout: expected one of nchw, nhwc, nc, ncw, got 'nwhc'"],
        id="bad-layout",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    version: '2.0'\n    source: {type: synthetic}\n",
        ["profile.yaml:3: pipelines[0]: pipeline 'p': version pins a registry model, but model is a file path"],
        id="version-on-file-model",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n"
        "    postprocess: {type: threshold, threshold: 0.5, off_threshold: 0.7}\n",
        [
            "profile.yaml:6: pipelines[0].postprocess: off_threshold 0.7 is above threshold 0.5; it must be at or below it"
        ],
        id="hysteresis-inverted",
    ),
    pytest.param(
        "device: {id: d}\ndevice: {id: e}\n",
        ["profile.yaml:2: device: duplicate key; each key may appear once"],
        id="duplicate-key",
    ),
    pytest.param("device: {id: d\n", None, id="yaml-syntax"),
    pytest.param(
        "- just\n- a list\n",
        ["profile.yaml:1: expected a mapping of profile sections (device, mqtt, pipelines, ...), got a list"],
        id="not-a-mapping",
    ),
    pytest.param(
        "",
        ["profile.yaml:1: expected a mapping of profile sections (device, mqtt, pipelines, ...), got an empty file"],
        id="empty-file",
    ),
    pytest.param(
        "device: {id: d, state_dir: '${NOPE}'}\n",
        ["profile.yaml:1: device.state_dir: environment variable NOPE is not set"],
        id="missing-env-var",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: audio, path: a.wav, window: -1}\n",
        ["profile.yaml:5: pipelines[0].source.window: expected an integer > 0 and <= 1048576, got -1"],
        id="negative-window",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: synthetic}\n    inputs: {sr: 16000}\n"
        "    state: {sr: stateN}\n",
        ["profile.yaml:3: pipelines[0]: pipeline 'p': input 'sr' is both a constant and a state"],
        id="input-and-state",
    ),
    pytest.param(
        "mqtt: {url: 'mqtt://b'}\ndevice:\n  group: north\n  id: fleet\n",
        [
            "profile.yaml:4: device.id: 'fleet' is a topic level the agent itself uses "
            "(cmd, deploy, events, fleet, health, status); choose another device id"
        ],
        id="device-named-fleet",
    ),
    pytest.param(
        "device: {id: d}\npipelines:\n  - name: cmd\n    model: m.onnx\n    source: {type: synthetic}\n",
        [
            "profile.yaml:3: pipelines[0].name: 'cmd' is a topic level the agent itself uses "
            "(cmd, deploy, events, fleet, health, status); choose another pipeline name"
        ],
        id="pipeline-named-cmd",
    ),
]


RESERVED_WORDS = "(cmd, deploy, events, fleet, health, status); choose another device id"


@pytest.mark.parametrize("word", ["status", "health", "events", "cmd", "deploy", "fleet"])
def test_every_reserved_topic_word_is_refused_as_a_device_id_and_a_pipeline_name(tmp_path: Path, word: str) -> None:
    device = errors_of(tmp_path, f"device: {{id: {word}}}\n")
    assert device == [f"profile.yaml:1: device.id: {word!r} is a topic level the agent itself uses " + RESERVED_WORDS]
    pipeline = errors_of(
        tmp_path, f"device: {{id: d}}\npipelines:\n  - {{name: {word}, model: m.onnx, source: {{type: synthetic}}}}\n"
    )
    assert pipeline == [
        f"profile.yaml:3: pipelines[0].name: {word!r} is a topic level the agent itself uses "
        + RESERVED_WORDS.replace("device id", "pipeline name")
    ]


def test_names_that_only_contain_a_reserved_word_are_fine(tmp_path: Path) -> None:
    text = "device: {id: fleet-01}\npipelines:\n  - {name: cmd-cam, model: m.onnx, source: {type: synthetic}}\n"
    profile = load_profile(write(tmp_path, text), environ={})
    assert profile.device.id == "fleet-01" and profile.pipelines[0].name == "cmd-cam"


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_bad_profile_messages(tmp_path: Path, text: str, expected: list[str] | None) -> None:
    errors = errors_of(tmp_path, text)
    if expected is None:  # YAML syntax: the wording is PyYAML's; the location and prefix are ours
        assert errors == ["profile.yaml:2: YAML syntax: did not find expected ',' or '}'"]
        return
    assert errors == expected


def test_all_errors_of_a_file_at_once(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """\
        device: {id: d}
        mqt: {url: "mqtt://x"}
        runtime: {threads: 0}
        health: {interval: soon}
        pipelines:
          - name: p
            model: m.onnx
            source: {type: camera, fps: fast}
        """,
    )
    assert [e.split(": ")[0:2] for e in errors] == [
        ["profile.yaml:2", "mqt"],
        ["profile.yaml:3", "runtime.threads"],
        ["profile.yaml:4", "health.interval"],
        ["profile.yaml:8", "pipelines[0].source.device"],
        ["profile.yaml:8", "pipelines[0].source.fps"],
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path / "missing.yaml")
    assert str(info.value).endswith("missing.yaml:0: cannot read: No such file or directory")


# -- files the profile names ------------------------------------------------------------------------

FILES = """\
device: {id: d}
registry: {url: "http://127.0.0.1:8780", public_key: keys/registry.pub}
mqtt:
  url: "mqtts://broker:8883"
  password_file: secrets/mqtt.password
  tls: {ca: ca.pem}
pipelines:
  - name: gate
    model: ./models/det.onnx
    source: {type: synthetic}
    postprocess: {type: classification, labels: labels.txt}
"""


def file_errors(tmp_path: Path, files: str) -> list[str]:
    with pytest.raises(ProfileError) as info:
        load_profile(write(tmp_path, FILES), environ={}, files=files)  # type: ignore[arg-type]
    return [str(i).replace(str(tmp_path) + "/", "") for i in info.value.issues]


def test_files_a_profile_names_are_not_looked_for_unless_asked(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, FILES), environ={})
    assert profile.registry is not None and profile.registry.public_key == tmp_path / "keys/registry.pub"


def test_every_missing_file_is_a_located_error(tmp_path: Path) -> None:
    assert file_errors(tmp_path, "all") == [
        "profile.yaml:2: registry.public_key: no such file: keys/registry.pub (the registry's public key)",
        "profile.yaml:5: mqtt.password_file: no such file: secrets/mqtt.password (the broker password)",
        "profile.yaml:6: mqtt.tls.ca: no such file: ca.pem (a TLS file)",
        "profile.yaml:9: pipelines[0].model: no such file: models/det.onnx (the model file)",
        "profile.yaml:11: pipelines[0].postprocess.labels: no such file: labels.txt (the labels file)",
    ]


def test_the_service_needs_its_own_files_and_leaves_model_files_to_each_pipeline(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "keys")  # run parses the key: a real one (tests/test_hostile_profile.py: bad ones)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/mqtt.password").write_text("pw")
    (tmp_path / "ca.pem").mkdir()  # a folder where a file belongs
    assert file_errors(tmp_path, "service") == ["profile.yaml:6: mqtt.tls.ca: not a file: ca.pem (a TLS file)"]
    (tmp_path / "ca.pem").rmdir()
    (tmp_path / "ca.pem").write_text("ca")
    assert load_profile(write(tmp_path, FILES), environ={}, files="service").pipelines[0].name == "gate"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_check_and_run_refuse_a_missing_public_key_with_its_line(tmp_path: Path) -> None:
    profile = write(tmp_path, 'device: {id: d}\nregistry: {url: "http://127.0.0.1:9", public_key: registry.pub}\n')
    checked = run_cli("check", profile)
    assert checked.returncode == 2
    assert checked.stderr == (
        f"{profile}:2: registry.public_key: no such file: {tmp_path / 'registry.pub'} (the registry's public key)\n"
    )
    assert run_cli("check", "--no-files", profile).returncode == 0
    ran = run_cli("run", "--profile", profile)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert f"{profile}:2: registry.public_key: no such file: " in ran.stderr


# -- homeassistant --------------------------------------------------------------------------------


def test_homeassistant_discovery_is_off_by_default(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD), environ={})
    assert not profile.homeassistant.enabled and profile.homeassistant.discovery_prefix == "homeassistant"
    on = load_profile(write(tmp_path, GOOD + "homeassistant: {enabled: true, discovery_prefix: site/ha}\n"), environ={})
    assert on.homeassistant.enabled and on.homeassistant.discovery_prefix == "site/ha"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "device: {id: d}\nhomeassistant: {enabled: true}\n",
            "profile.yaml:2: homeassistant.enabled: Home Assistant discovery is published over MQTT: add the mqtt "
            "section (the broker Home Assistant reads)",
        ),
        (
            "device: {id: d}\nmqtt: {url: 'mqtt://b'}\nhomeassistant: {enabled: true, discovery_prefix: 'ha/#'}\n",
            "profile.yaml:3: homeassistant.discovery_prefix: expected a topic level without spaces, '+' or '#', "
            "got 'ha/#'",
        ),
        (
            "device: {id: d}\nmqtt: {url: 'mqtt://b'}\nhomeassistant: {enable: true}\n",
            "profile.yaml:3: homeassistant.enable: unknown key (did you mean 'enabled'?)",
        ),
    ],
)
def test_homeassistant_mistakes(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]
