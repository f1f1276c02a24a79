"""Typed input events and the validation rules of the public contract (no Beam in here).

`parse_transaction` and `parse_feedback` turn a raw Pub/Sub payload into a typed event or raise
`InvalidMessage`, whose `kind` is a stable counter name and whose text names the field and the
rule that was broken. `dead_letter` builds the contract's dead-letter record.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ID_CHARS = 128

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MICROSECOND = dt.timedelta(microseconds=1)
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:\d{2})?"
)


class Transaction(NamedTuple):
    """A validated card payment. `event_time` is kept as received; `event_time_us` is UTC."""

    transaction_id: str
    event_time: str
    event_time_us: int
    customer_id: str
    terminal_id: str
    amount: float


class Feedback(NamedTuple):
    """A validated fraud report (or, with `is_fraud` false, the retraction of one)."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    event_time: str
    event_time_us: int
    reported_at: str
    reported_at_us: int
    is_fraud: bool


class InvalidMessage(ValueError):
    """A message that breaks the contract. `kind` names the rule, for counters."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# Every error kind a message can be rejected with; pipelines keep one counter per kind.
ERROR_KINDS = (
    "payload_too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_id",
    "id_too_long",
    "negative_amount",
    "non_finite_amount",
    "timestamp_without_zone",
    "timestamp_unparsable",
    "reported_before_event",
    "bad_attributes",
)

# Pub/Sub's own limits are 100 attributes, keys of 256 bytes and values of 1024 bytes; the
# project's publishers send 3 or 4, so anything near those limits is abuse, rejected unparsed.
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024


def format_timestamp(micros: int) -> str:
    """RFC 3339 in UTC with a `Z`; fractional seconds only when there are any."""
    moment = _EPOCH + dt.timedelta(microseconds=micros)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str, field: str) -> int:
    """Microseconds since the epoch (UTC) of an RFC 3339 timestamp that carries a zone."""
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise InvalidMessage(
            "timestamp_unparsable",
            f"{field}: {_quote(value)} is not an RFC 3339 timestamp (expected e.g. 2018-08-08T00:01:14Z)",
        )
    zone = match.group("zone")
    if zone is None:
        raise InvalidMessage(
            "timestamp_without_zone",
            f"{field}: {_quote(value)} has no time zone; add Z or an offset such as +02:00",
        )
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction = (match.group(7) or "").ljust(6, "0")[:6]
    try:
        offset = dt.timedelta(0)
        if zone not in ("Z", "z"):
            sign = 1 if zone[0] == "+" else -1
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            offset = sign * dt.timedelta(hours=hours, minutes=minutes)
        moment = dt.datetime(year, month, day, hour, minute, second, int(fraction), tzinfo=dt.timezone(offset))
    except ValueError as err:
        raise InvalidMessage(
            "timestamp_unparsable", f"{field}: {_quote(value)} is not a valid date and time ({err})"
        ) from None
    return (moment - _EPOCH) // _ONE_MICROSECOND


def decode_object(payload: bytes) -> dict[str, Any]:
    """The JSON object in a payload, after the size, encoding and syntax checks."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidMessage(
            "payload_too_large",
            f"message: payload is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidMessage(
            "not_utf8", f"message: payload is not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InvalidMessage("not_json", f"message: payload is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise InvalidMessage("not_object", f"message: payload is a JSON {_json_type(value)}, expected an object")
    return value


TRANSACTION_FIELDS = ("transaction_id", "event_time", "customer_id", "terminal_id", "amount")
FEEDBACK_FIELDS = ("transaction_id", "customer_id", "terminal_id", "event_time", "reported_at", "is_fraud")


def check_attributes(attributes: Mapping[str, Any] | None) -> None:
    """Reject abusive message attributes (too many, too long, not text) before the payload is parsed."""
    if not attributes:
        return
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidMessage("bad_attributes", f"attributes: at most {MAX_ATTRIBUTES} allowed, got {len(attributes)}")
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMessage("bad_attributes", f"attributes: keys and values must be strings, got {_json_type(value)} for {_quote(str(key))}")
        if len(key.encode("utf-8")) > MAX_ATTRIBUTE_KEY_BYTES:
            raise InvalidMessage("bad_attributes", f"attributes: key {_quote(key)} is longer than {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if len(value.encode("utf-8")) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise InvalidMessage(
                "bad_attributes", f"attributes: value of {_quote(key)} is longer than {MAX_ATTRIBUTE_VALUE_BYTES} bytes"
            )


def kept_attributes(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """Attributes as a dead letter keeps them: at most `MAX_ATTRIBUTES`, each cut to the limits."""
    kept = {}
    for key, value in list((attributes or {}).items())[:MAX_ATTRIBUTES]:
        kept[str(key)[:MAX_ATTRIBUTE_KEY_BYTES]] = str(value)[:MAX_ATTRIBUTE_VALUE_BYTES]
    return kept


def parse_transaction(payload: bytes) -> Transaction:
    """Validate a payload of the `transactions` topic."""
    return transaction_from_object(decode_object(payload))


def parse_feedback(payload: bytes) -> Feedback:
    """Validate a payload of the `fraud-feedback` topic."""
    return feedback_from_object(decode_object(payload))


def transaction_from_object(obj: Mapping[str, Any]) -> Transaction:
    """Validate an already decoded transaction object."""
    _require(obj, TRANSACTION_FIELDS)
    transaction_id = _id(obj, "transaction_id")
    event_time = _string(obj, "event_time")
    event_time_us = parse_timestamp(event_time, "event_time")
    customer_id = _id(obj, "customer_id")
    terminal_id = _id(obj, "terminal_id")
    amount = _amount(obj, "amount")
    return Transaction(transaction_id, event_time, event_time_us, customer_id, terminal_id, amount)


def feedback_from_object(obj: Mapping[str, Any]) -> Feedback:
    """Validate an already decoded feedback object."""
    _require(obj, FEEDBACK_FIELDS)
    transaction_id = _id(obj, "transaction_id")
    customer_id = _id(obj, "customer_id")
    terminal_id = _id(obj, "terminal_id")
    event_time = _string(obj, "event_time")
    event_time_us = parse_timestamp(event_time, "event_time")
    reported_at = _string(obj, "reported_at")
    reported_at_us = parse_timestamp(reported_at, "reported_at")
    if reported_at_us < event_time_us:
        raise InvalidMessage(
            "reported_before_event",
            f"reported_at: {_quote(reported_at)} is before event_time {_quote(event_time)}",
        )
    is_fraud = _field(obj, "is_fraud")
    if not isinstance(is_fraud, bool):
        raise _wrong_type("is_fraud", "a boolean", is_fraud)
    return Feedback(
        transaction_id,
        customer_id,
        terminal_id,
        event_time,
        event_time_us,
        reported_at,
        reported_at_us,
        is_fraud,
    )


def contract_fields(event: Transaction | Feedback) -> dict[str, Any]:
    """The event as the contract's JSON object (timestamps as received)."""
    if isinstance(event, Transaction):
        return {
            "transaction_id": event.transaction_id,
            "event_time": event.event_time,
            "customer_id": event.customer_id,
            "terminal_id": event.terminal_id,
            "amount": event.amount,
        }
    return {
        "transaction_id": event.transaction_id,
        "customer_id": event.customer_id,
        "terminal_id": event.terminal_id,
        "event_time": event.event_time,
        "reported_at": event.reported_at,
        "is_fraud": event.is_fraud,
    }


def replay_record(event: Transaction | Feedback) -> dict[str, Any]:
    """A replay-file line for the event: `{"kind": ..., "event": {...}}`."""
    kind = "transaction" if isinstance(event, Transaction) else "feedback"
    return {"kind": kind, "event": contract_fields(event)}


def dead_letter(
    source: str,
    error: str,
    payload: bytes,
    attributes: Mapping[str, str] | None,
    received_at_us: int,
) -> dict[str, Any]:
    """The contract's dead-letter record: what came in, from where, and what was wrong."""
    return {
        "source": source,
        "error": error,
        "payload_base64": base64.b64encode(payload).decode("ascii"),
        "attributes": kept_attributes(attributes),
        "received_at": format_timestamp(received_at_us),
    }


def _require(obj: Mapping[str, Any], names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in obj]
    if len(missing) == 1:
        raise InvalidMessage("missing_field", f"{missing[0]}: required field is missing")
    if missing:
        raise InvalidMessage("missing_field", f"{', '.join(missing)}: required fields are missing")


def _field(obj: Mapping[str, Any], name: str) -> Any:
    if name not in obj:
        raise InvalidMessage("missing_field", f"{name}: required field is missing")
    return obj[name]


def _string(obj: Mapping[str, Any], name: str) -> str:
    value = _field(obj, name)
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    return value


def _id(obj: Mapping[str, Any], name: str) -> str:
    value = _string(obj, name)
    if not value:
        raise InvalidMessage("empty_id", f"{name}: must be 1 to {MAX_ID_CHARS} characters, got an empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidMessage("id_too_long", f"{name}: must be 1 to {MAX_ID_CHARS} characters, got {len(value)}")
    return value


def _amount(obj: Mapping[str, Any], name: str) -> float:
    value = _field(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    try:
        amount = float(value)
    except OverflowError:
        amount = math.inf
    if not math.isfinite(amount):
        raise InvalidMessage("non_finite_amount", f"{name}: must be a finite number, got {value!r}")
    if amount < 0:
        raise InvalidMessage("negative_amount", f"{name}: must be >= 0, got {value!r}")
    return amount


def _wrong_type(name: str, expected: str, value: Any) -> InvalidMessage:
    return InvalidMessage("wrong_type", f"{name}: expected {expected}, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _quote(value: str, limit: int = 64) -> str:
    shown = value if len(value) <= limit else value[:limit] + "..."
    return json.dumps(shown)
