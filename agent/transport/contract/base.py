"""What every wire model shares: strict, closed and immutable, and the one error a violation raises."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, TypeAdapter, ValidationError

from agent.util import jsonlimits
from agent.util.jsonlimits import MAX_PAYLOAD_BYTES

# Every payload stamps its time as `agent.util.timefmt.utc_iso` writes it: UTC, milliseconds, `Z`.
Timestamp = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
Text = Annotated[str, StringConstraints(min_length=1)]  # a name or a reason: never empty

W = TypeVar("W")
M = TypeVar("M", bound=BaseModel)


class ContractError(Exception):
    """A payload that does not match its contract; the message names what, and the field.

    Not a ValueError on purpose: producers catch ValueError for bad input, and a producer that builds
    a wrong event has a bug that must not pass as bad input."""

    def __init__(self, what: str, message: str, field: str | None = None) -> None:
        self.what, self.field = what, field
        super().__init__(f"{what}: field {field!r}: {message}" if field else f"{what}: {message}")


class Wire(BaseModel):
    """Unknown keys are errors, no value is coerced into another type, nothing changes after validation.

    A model's validator is built when it first validates, not when its module loads: a process uses a
    few of the contract's dozens of models, and building them all cost every start ~50 ms (issue 15)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, defer_build=True)


def check(adapter: TypeAdapter[W], data: object, what: str) -> W:
    """`data` validated (ContractError naming the first wrong field)."""
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise _contract_error(exc, what) from None


def check_model(model: type[M], data: object, what: str) -> M:
    """`data` validated as `model` (ContractError naming the first wrong field); the model's own validator,
    so that a deferred model is built once, for validation and serialization alike."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _contract_error(exc, what) from None


def check_json(model: type[M], raw: bytes | str, what: str, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """`raw` validated as `model` by pydantic's own JSON parser, in one pass: a third of the time of
    `decode` then `check_model` (`fleet status` reads 10,000 healths and statuses), within the same bounds,
    with the same answers; a payload that is not a JSON object gets `decode`'s message for it."""
    try:
        return model.model_validate_json(jsonlimits.bounded(raw, max_bytes=max_bytes))
    except jsonlimits.JSONLimitError as exc:
        raise ContractError(what, str(exc)) from None
    except ValidationError as exc:
        if not all(e["loc"] for e in exc.errors(include_url=False)):
            decode(raw, what, max_bytes)  # not JSON, or not an object: decode says which
        raise _contract_error(exc, what) from None


def decode(raw: bytes | str, what: str, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, object]:
    """A payload as the JSON object every message is (ContractError otherwise), bounded in size and
    nesting by agent.util.jsonlimits, the one bounded decoder of untrusted JSON."""
    try:
        doc = jsonlimits.loads(raw, max_bytes=max_bytes)
    except ValueError as exc:
        raise ContractError(what, str(exc)) from None
    if not isinstance(doc, dict):
        raise ContractError(what, f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _contract_error(exc: ValidationError, what: str) -> ContractError:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    got = f" (got {first['input']!r})" if first["type"] not in ("missing", "extra_forbidden") else ""
    return ContractError(what, f"{first['msg']}{got}"[:300], field)
