"""The profile's `endpoint` section: the KServe v2 inference endpoint, off by default.

Its address, who may call it (a bearer token from the environment or a file, or mutual TLS) and the
bounds every request is held to (body size, tensor elements, a deadline, runs in flight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from agent.config.base import Check, Field, ProfilePath, Strict
from agent.config.runtime import HTTP_ADDRESS_PATTERN, check_port
from agent.config.units import Duration, Size

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True, kw_only=True)
class EndpointTlsConfig(Strict):
    cert: ProfilePath = Field(description="the endpoint's server certificate (PEM)")
    key: ProfilePath = Field(description="the server certificate's private key (PEM)")
    client_ca: ProfilePath | None = Field(
        None, description="CA (PEM) that signs client certificates; when set, every client must present one (mTLS)"
    )


@dataclass(frozen=True, kw_only=True)
class EndpointConfig(Strict):
    enabled: bool = Field(False, description="serve the pipelines' models over the KServe v2 HTTP protocol")
    address: Annotated[str, Check(check_port)] = Field(
        "127.0.0.1:8000",
        pattern=HTTP_ADDRESS_PATTERN,
        description="host:port the endpoint listens on; an address beyond loopback needs a token or mTLS",
    )
    token_env: str | None = Field(
        None,
        pattern=ENV_NAME_PATTERN,
        description="name of an environment variable holding the bearer token clients must send",
    )
    token_file: ProfilePath | None = Field(None, description="a file holding the bearer token clients must send")
    tls: EndpointTlsConfig | None = Field(None, description="serve HTTPS; with client_ca, mutual TLS")
    max_body: Size = Field(
        64 * 1024**2, gt=0, le=2 * 1024**3, description="largest request body; a larger one is refused unread (413)"
    )
    max_elements: int = Field(
        16 * 1024**2, gt=0, description="most tensor elements in one request, all inputs together"
    )
    deadline: Duration = Field(
        10.0, gt=0, description="longest a request may take to arrive and to get a free inference slot"
    )
    concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="inferences the endpoint runs at once; the rest wait (up to the deadline), so that the "
        "pipelines keep their share of the device",
    )
    max_clients: int = Field(16, ge=1, le=1024, description="connections served at once; more are refused (503)")

    def __post_init__(self) -> None:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give the bearer token one way: token_env or token_file, not both")
        host = self.address.rsplit(":", 1)[0]
        guarded = self.token_env or self.token_file or (self.tls is not None and self.tls.client_ca is not None)
        if self.enabled and host not in LOOPBACK_HOSTS and not guarded:
            raise ValueError(
                f"endpoint on {self.address} is reachable beyond this machine: set token_env or token_file, "
                "or tls.client_ca (mutual TLS), or bind to 127.0.0.1"
            )
