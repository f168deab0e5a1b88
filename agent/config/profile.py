"""The device profile: YAML validated once into immutable, typed objects the rest of the code trusts.

Line numbers and error wording live in `agent.config.errors`, YAML with lines in `agent.config.yamldoc`;
this module holds the shape and loads a file through them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from agent.config import snapshot as snapshots
from agent.config.base import Check, Field, PluginChoice, ProfilePath, Secret, Strict, adapter
from agent.config.checks import (
    NOT_RESERVED_SCHEMA,
    Problem,
    check_url,
    cross_field_problems,
    looks_like_path,
    not_reserved,
    raise_problems,
)
from agent.config.endpoint import EndpointConfig
from agent.config.errors import PATTERN_WORDS, Issue, ProfileError, format_path
from agent.config.files import FileCheck, missing_files
from agent.config.homeassistant import HomeAssistantConfig
from agent.config.presets import PresetName
from agent.config.runtime import Optimization
from agent.config.runtime import RuntimeConfig as RuntimeConfig  # re-exported: every part looks for it here
from agent.config.units import Duration, Size
from agent.config.yamldoc import KeyPath, YamlDoc, YamlSyntaxError, expand_env, parse_bytes, read_bytes
from agent.inference.processing.post import POSTPROCESSORS
from agent.inference.processing.pre import PreprocessConfig
from agent.inference.sources import SOURCES
from agent.util import names, redact
from agent.util.files import read_secret
from agent.util.names import NAME_PATTERN, NAME_WORDS

if TYPE_CHECKING:
    from typing import TypeAlias

    from agent.config.base import PluginConfig

TOPIC_PREFIX_PATTERN = r"^[^#+\s]+$"
MAX_PIPELINES = 256  # one device runs a handful; the bound keeps a hostile profile's errors few
PATTERN_WORDS[NAME_PATTERN] = NAME_WORDS
PATTERN_WORDS[TOPIC_PREFIX_PATTERN] = "a topic level without spaces, '+' or '#'"


def _device_id(value: str) -> str:
    return not_reserved(value, "device id")


def _pipeline_name(value: str) -> str:
    return not_reserved(value, "pipeline name")


def _registry_url(value: str) -> str:
    check_url(value, ("http", "https"), "an http:// or https:// URL")
    return value if value.endswith("/") else value + "/"


def _mqtt_url(value: str) -> str:
    return check_url(value, ("mqtt", "mqtts"), "mqtt://host[:port] or mqtts://host[:port]")


def _model_path(value: str, context: Mapping[str, Any]) -> str:
    # A model file is relative to the profile's folder, like every other path in a profile.
    base = context.get("base_dir")
    if base is not None and looks_like_path(value) and not os.path.isabs(os.path.expanduser(value)):
        return str(Path(base) / value)
    return os.path.expanduser(value) if looks_like_path(value) else value


def _none_is_empty(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) > MAX_PIPELINES:  # before each is validated
        raise ValueError(f"{len(value)} pipelines; at most {MAX_PIPELINES}")
    return () if value is None else value


@dataclass(frozen=True, kw_only=True)
class DeviceConfig(Strict):
    id: Annotated[str, Check(_device_id)] = Field(
        pattern=NAME_PATTERN,
        description="this device's name in topics and the fleet (letters, digits, _ . -)",
        json_schema_extra=NOT_RESERVED_SCHEMA,
    )
    group: str = Field("default", pattern=NAME_PATTERN, description="the fleet group deployments target")
    state_dir: ProfilePath = Field(Path("/var/lib/edge-agent"), description="models, outbox and caches live here")


@dataclass(frozen=True, kw_only=True)
class ProbationConfig(Strict):
    duration: Duration = Field(
        120.0, ge=0, description="how long a new version is watched after activation; 0 turns probation off"
    )
    # 2x, not less: p95s taken minutes apart on a shared CPU differ by 1.6x with the same weights (measured).
    max_latency_ratio: float = Field(
        2.0, gt=1, description="roll back when inference p95 exceeds the previous version's by this factor"
    )
    # A tiny model's 0.3 ms p95 that doubles on a busy CPU is scheduling jitter, not a slower model.
    min_latency_increase: float = Field(
        1.0, ge=0, le=1e6, description="...and by at least this many milliseconds (absolute floor, ms)"
    )
    max_error_rate: float = Field(0.05, ge=0, le=1, description="roll back when this share of inferences fails")
    min_inferences: int = Field(20, ge=1, description="inferences needed before latency is judged")


@dataclass(frozen=True, kw_only=True)
class RegistryConfig(Strict):
    url: Annotated[str, Check(_registry_url)] = Field(
        description="base URL of the model registry (http:// or https://)"
    )
    public_key: ProfilePath = Field(
        description="the registry's root public key(s) (PEM), pinned at install (docs/trust.md); for a registry "
        "without signing roles, the key that signs manifests"
    )
    poll_interval: Duration = Field(300.0, gt=0, description="how often channels are checked for new versions")
    timeout: Duration = Field(30.0, gt=0, description="network timeout per request")
    keep_versions: int = Field(
        3, ge=2, description="versions of each model kept on disk (the active one and rollbacks)"
    )
    max_accuracy_loss: float = Field(
        0.01,
        ge=0,
        le=1,
        description="prefer an int8 variant (on a provider with int8 kernels) only when its manifest says it "
        "loses at most this share of accuracy",
    )
    probation: ProbationConfig = Field(
        default_factory=ProbationConfig, description="health-gated rollback after an update"
    )


@dataclass(frozen=True, kw_only=True)
class TlsConfig(Strict):
    ca: ProfilePath | None = Field(None, description="CA certificate (PEM) that signed the broker's certificate")
    cert: ProfilePath | None = Field(None, description="this device's client certificate (PEM), for mutual TLS")
    key: ProfilePath | None = Field(None, description="the client certificate's private key (PEM)")

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both for mutual TLS, or neither")


@dataclass(frozen=True, kw_only=True)
class OutboxConfig(Strict):
    max_bytes: Size = Field(
        256 * 1024**2,
        ge=64 * 1024,  # four of the smallest segments (agent.transport.outbox.bound): Outbox refuses less
        description="disk the outbox may use; the oldest messages go first",
    )
    max_age: Duration = Field(7 * 86400.0, gt=0, description="messages older than this are dropped and counted")


@dataclass(frozen=True, kw_only=True)
class MqttConfig(Strict):
    url: Annotated[str, Check(_mqtt_url)] = Field(description="the broker: mqtt://host[:port] or mqtts://host[:port]")
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="MQTT client id; the device id when unset"
    )
    username: str | None = Field(None, min_length=1, description="user name for the broker")
    password: Secret | None = Field(None, description="password; write ${ENV_VAR} rather than the secret itself")
    password_file: ProfilePath | None = Field(None, description="a file holding the password")
    tls: TlsConfig | None = Field(None, description="TLS files for mqtts://")
    topic_prefix: str = Field("edge", pattern=TOPIC_PREFIX_PATTERN, description="first level of every topic")
    protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="MQTT version; auto tries 5 then 3.1.1")
    keepalive: Duration = Field(60.0, ge=5, description="keepalive interval")
    qos: Literal[0, 1] = Field(1, description="default QoS for results")
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="the durable queue between producers and the broker"
    )
    preset: PresetName | None = Field(
        None, description="a managed broker whose unannounced limits the agent keeps to (see docs/brokers.md)"
    )

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        if self.secure and (self.tls is None or self.tls.ca is None):
            problems.append(
                (("url",), "url is mqtts:// but tls.ca is not set; give the CA that signed the broker's certificate")
            )
        if not self.secure and self.tls is not None:
            problems.append((("tls",), "tls is set but url is mqtt://; use mqtts:// to connect with TLS"))
        if self.password is not None and self.password_file is not None:
            problems.append((("password",), "password and password_file are both set; keep one"))
        raise_problems(problems)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.secure else 1883)

    @property
    def secure(self) -> bool:
        return self.url.startswith("mqtts://")

    def secret(self) -> str | None:
        """The password, read from its file at the moment it is needed, never stored in logs."""
        if self.password is not None:
            secret = self.password.get_secret_value()
        elif self.password_file is not None:
            secret = read_secret(self.password_file)
        else:
            return None
        redact.remember(secret)  # masked wherever it might be echoed from now on
        return secret


@dataclass(frozen=True, kw_only=True)
class HealthConfig(Strict):
    interval: Duration = Field(30.0, gt=0, description="how often health is published (and on every change)")
    stuck_after: Duration = Field(
        60.0,
        gt=0,
        description="one inference running longer than this counts as stuck: the systemd watchdog stops being fed",
    )


@dataclass(frozen=True, kw_only=True)
class BatchConfig(Strict):
    size: int = Field(1, ge=1, description="results sent together in one message")
    max_delay: Duration = Field(0.1, gt=0, description="longest a result waits for its batch to fill")


if TYPE_CHECKING:  # the plug-ins are found at run time: the type checker knows the protocol they share
    SourceConfig: TypeAlias = PluginConfig
    PostprocessConfig: TypeAlias = PluginConfig
else:
    SourceConfig = Annotated[Any, PluginChoice(SOURCES)]
    PostprocessConfig = Annotated[Any, PluginChoice(POSTPROCESSORS)]
Scalar = int | float | str | bool
Constant = Scalar | tuple[Scalar, ...]  # a constant model input beside the stream


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(Strict):
    name: Annotated[str, Check(_pipeline_name)] = Field(
        pattern=NAME_PATTERN, description="the pipeline's name in topics", json_schema_extra=NOT_RESERVED_SCHEMA
    )
    model: Annotated[str, Check(_model_path, context=True)] = Field(
        min_length=1, description="a registry model name, or a path to an .onnx or .ort file"
    )
    channel: str = Field("stable", pattern=NAME_PATTERN, description="registry channel followed")
    version: str | None = Field(None, min_length=1, description="pin this version instead of following the channel")
    source: SourceConfig = Field(description="where frames or samples come from")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="steps before inference")
    postprocess: PostprocessConfig = Field(
        default_factory=lambda: POSTPROCESSORS["raw"].Config(type="raw"),
        description="steps after inference",
    )
    rate: float | None = Field(None, gt=0, description="most inferences per second; every frame or window when unset")
    inputs: dict[str, Constant] = Field(default_factory=dict, description="constant inputs beside the stream")
    state: dict[str, str] = Field(
        default_factory=dict, description="recurrent state: input name <- previous step's output name"
    )
    qos: Literal[0, 1] | None = Field(None, description="QoS for this pipeline's results; mqtt.qos when unset")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="send several results in one message")
    optimization: Optimization | None = Field(
        None, description="graph optimisation level for this pipeline's model; runtime.optimization when unset"
    )
    enabled: bool = Field(True, description="start this pipeline with the daemon")

    @property
    def model_is_file(self) -> bool:
        return looks_like_path(self.model)

    def __post_init__(self) -> None:
        if self.model_is_file and self.version is not None:
            raise ValueError(f"pipeline {self.name!r}: version pins a registry model, but model is a file path")
        if not self.model_is_file:  # a registry model's name and version become folders of the store
            names.check(self.model, f"pipeline {self.name!r}: model")
        if self.version is not None:
            names.check(self.version, f"pipeline {self.name!r}: version", names.VERSION_PATTERN)
        clash = set(self.inputs) & set(self.state)
        if clash:
            raise ValueError(f"pipeline {self.name!r}: input {sorted(clash)[0]!r} is both a constant and a state")


@dataclass(frozen=True, kw_only=True)
class Profile(Strict):
    device: DeviceConfig = Field(description="who this device is")
    registry: RegistryConfig | None = Field(None, description="where models come from; file models only when unset")
    mqtt: MqttConfig | None = Field(None, description="the broker; results go to stdout as JSON lines when unset")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="ONNX Runtime settings")
    health: HealthConfig = Field(default_factory=HealthConfig, description="health reporting")
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery (off by default)"
    )
    endpoint: EndpointConfig = Field(
        default_factory=EndpointConfig, description="the KServe v2 inference endpoint (off by default)"
    )
    pipelines: Annotated[tuple[PipelineConfig, ...], Check(_none_is_empty, "before")] = Field(
        (), max_length=MAX_PIPELINES, description="inference loops"
    )

    @property
    def registry_pipelines(self) -> tuple[PipelineConfig, ...]:
        """Enabled pipelines whose model comes from the registry (the ones updates and deployments touch)."""
        return tuple(p for p in self.pipelines if p.enabled and not p.model_is_file)


def load_profile(
    path: str | Path, environ: dict[str, str] | None = None, files: FileCheck = "none", snapshot: bool = False
) -> Profile:
    """Read, expand and validate a profile; raise ProfileError with every located problem (with `files`,
    also each file it names that this machine lacks: agent.config.files). With `snapshot`, a profile that
    validated before, unchanged, comes from its snapshot in the cache folder (agent.config.snapshot)."""
    path = Path(path)
    name = str(path)
    try:
        raw = read_bytes(path)
    except OSError as exc:
        raise ProfileError([Issue(name, 0, "", f"cannot read: {exc.strerror or exc}")]) from None
    base_dir = path.resolve().parent
    env = os.environ if environ is None else environ
    kept = snapshots.location(path.resolve()) if snapshot else None
    key = snapshots.document_key(raw, env, base_dir) if kept is not None else ""
    found = snapshots.load(kept, key, Profile) if kept is not None else None
    if found is not None:
        profile, expanded = found
        for key_name, template in expanded:  # masked as a validation masks them
            redact.remember_expanded(template, key_name, env)
        if not missing_files(profile, files):
            return profile  # else a file it names is gone: the check below locates it
    try:
        doc = parse_bytes(raw)
    except UnicodeDecodeError:
        raise ProfileError([Issue(name, 1, "", "not a text file (expected UTF-8 YAML)")]) from None
    except YamlSyntaxError as exc:
        raise ProfileError([Issue(name, exc.line, "", f"YAML syntax: {exc.message}")]) from None
    profile, expanded = _checked(doc, name, base_dir, env, files)
    if kept is not None:
        snapshots.save(kept, key, profile, expanded)
    return profile


def _checked(
    doc: YamlDoc, name: str, base_dir: Path, environ: Mapping[str, str], files: FileCheck
) -> tuple[Profile, list[tuple[str, str]]]:
    """`doc` expanded and validated (ProfileError with every located problem), and where its `${VAR}`s stand
    (the key above each, and the text)."""
    issues = [
        Issue(name, line, format_path(p), "duplicate key; each key may appear once") for p, line in doc.duplicates
    ]
    if not isinstance(doc.data, dict):
        got = "an empty file" if doc.data is None else f"a {type(doc.data).__name__}"
        raise ProfileError(
            issues
            + [Issue(name, 1, "", f"expected a mapping of profile sections (device, mqtt, pipelines, ...), got {got}")]
        )
    expanded = expand_env(doc.data, environ)
    templates: list[tuple[str, str]] = []
    for key_path in expanded.secret_paths:  # a ${VAR} named like a secret is masked in replies, events, logs
        template: Any = doc.data
        for part in key_path:
            template = template[part]
        templates.append((str(key_path[-1]) if key_path else "", template))
        redact.remember_expanded(template, templates[-1][0], environ)
    for key_path, var in expanded.missing:
        issues.append(
            Issue(name, doc.line_of(key_path), format_path(key_path), f"environment variable {var} is not set")
        )
    profile = _validate(expanded.data, doc, name, base_dir, expanded.secret_paths, issues)
    if profile is not None:
        issues += [Issue(name, doc.line_of(p), format_path(p), m) for p, m in missing_files(profile, files)]
    if issues:
        raise ProfileError(sorted(issues, key=lambda i: i.line))
    assert profile is not None
    return profile, templates


def _validate(
    data: dict[str, Any], doc: YamlDoc, name: str, base_dir: Path, secret_paths: set[KeyPath], issues: list[Issue]
) -> Profile | None:
    """`data` validated by pydantic, its problems added to `issues`."""
    from agent.config.validate import validate  # pydantic: only where a profile is checked

    # Checks across sections run on the raw document, so that they are reported together with field errors.
    issues += [Issue(name, doc.line_of(p), format_path(p), m) for p, m in cross_field_problems(data)]
    profile, problems = validate(Profile, data, {"base_dir": base_dir}, doc, name, secret_paths)
    issues += problems
    return profile


def profile_schema() -> dict[str, Any]:
    """The JSON Schema editors use to complete and check profiles."""
    text = json.dumps(adapter(Profile).json_schema())
    # Plug-in configs are all called Config; give their definitions readable names.
    for plugins, suffix in ((SOURCES, "Source"), (POSTPROCESSORS, "Postprocess")):
        for module in plugins.values():
            short = module.__name__.rsplit(".", 1)[-1]
            pretty = "".join(w.capitalize() for w in short.split("_")) + suffix
            text = text.replace(module.__name__.replace(".", "__") + "__Config", pretty)
    schema: dict[str, Any] = json.loads(text)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edge-agent.dev/profile.schema.json"
    schema["title"] = "edge-agent device profile"
    return schema
