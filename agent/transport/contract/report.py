"""The device's signed deployment report, retained on `<prefix>/<device>/report`: where it stands on an order.

A device signs each report with its own identity key (`agent.service.identity`), so that the fleet's
rollout controller counts only what the device itself said: a client that can write the topic cannot
make a device look active, and an old report published again names an old order (the order id is the
report's nonce). The payload is the report's JSON *text* and the signature over its exact bytes, as a
deployment order travels:

    {"report": "<the report's JSON text>", "sig": {"alg": "ed25519", "key": KEYID, "sig": BASE64}}

The report is retained: its latest state is what the device says now, and a controller that restarts
reads every device's latest report back from the broker.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from agent.transport.contract.base import ContractError, Text, Timestamp, Wire, check_model, decode

SCHEMA = 1
MAX_REPORT_BYTES = 16 * 1024

# The order's progress on the device; `active` reports come again with fresh vitals while the version
# is young (see `Vitals`), the others once.
ReportState = Literal["downloading", "verifying", "active", "refused", "rolled-back", "rollback-failed", "error"]
FAILED_STATES: frozenset[str] = frozenset({"refused", "rolled-back", "rollback-failed"})


class Vitals(Wire):
    """How the version behaves on this device since it went active, against the version before it here.

    Counts and times are never negative, nor NaN or infinite: the fleet's gates divide by them, and a
    device counts them from monotonic counters (`agent.service.reporter`)."""

    inferences: int = Field(ge=0)  # since the swap
    errors: int = Field(ge=0)  # failed inferences since the swap
    nan: int = Field(ge=0)  # inferences with a NaN or an infinity in an output, since the swap
    drops: int = Field(ge=0)  # frames dropped since the swap
    # This version's inference p95 (None before enough runs).
    p95_ms: float | None = Field(None, ge=0, allow_inf_nan=False)
    # The previous version's own p95 on this device, taken just before the swap.
    baseline_p95_ms: float | None = Field(None, ge=0, allow_inf_nan=False)
    active_s: float = Field(ge=0, allow_inf_nan=False)  # seconds since the swap


class DeviceReport(Wire):
    """One step of one order on one device."""

    schema_: Literal[1] = Field(alias="schema")  # `schema` itself is a BaseModel method
    device: Text
    order: Text  # the deployment order this is about: the nonce that makes an old report useless
    ts: Timestamp
    model: Text
    version: Text  # the version the order names
    state: ReportState
    running: str | None = None  # the version serving now (after a rollback: the one it went back to)
    digest: str | None = None  # sha256 of the file serving `running`, when it is a registry model
    variant: str | None = None
    provider: str | None = None  # the provider the session proved to run on
    previous: str | None = None  # the version active before the order
    previous_provider: str | None = None
    fallback: bool = False  # the provider ranks below the one the previous version ran on here
    reason: str | None = None  # refused, rolled back, error: the device's one line
    vitals: Vitals | None = None


def report_text(report: DeviceReport) -> bytes:
    """The exact bytes a device signs."""
    return report.model_dump_json(by_alias=True, exclude_none=True).encode()


def parse_report_text(text: bytes | str) -> DeviceReport:
    """A report's JSON text, strictly (ContractError naming the field)."""
    return check_model(DeviceReport, decode(text, "report"), "report")


def split_signed(raw: bytes) -> tuple[bytes, bytes]:
    """(report text, signature file bytes) from a retained payload; ContractError when it is not one."""
    if len(raw) > MAX_REPORT_BYTES:
        raise ContractError("report", f"{len(raw)} bytes; the limit is {MAX_REPORT_BYTES}")
    doc = decode(raw, "report")
    if set(doc) != {"report", "sig"} or not isinstance(doc["report"], str) or not isinstance(doc["sig"], dict):
        raise ContractError("report", 'expected {"report": "<JSON text>", "sig": {...}}')
    return doc["report"].encode(), json.dumps(doc["sig"]).encode()


def signed_payload(text: bytes, signature: bytes) -> bytes:
    """The retained payload: the report's text and its signature file's bytes, as `split_signed` reads them."""
    return json.dumps({"report": text.decode(), "sig": json.loads(signature)}, separators=(",", ":")).encode()
