"""Sign and verify ``x-lacuna-signature`` headers (SPEC §1); sign Standard Webhooks (SPEC §7).

Pure: no clock, no I/O. Header grammar of ``x-lacuna-signature``:
comma-separated ``key=value`` items, whitespace around items ignored, exactly
one ``t`` (integer Unix seconds) and one or more ``v1`` (hex HMAC-SHA256 of
``f"{t}.".encode() + body`` keyed with the secret's UTF-8 bytes). Unknown
schemes are ignored. The parser is total: whatever the header holds, it raises
nothing but ``SignatureError`` subclasses.

``standard_webhooks_key`` and ``sign_standard_webhooks`` are the outbound side:
what the ``http`` handler puts in ``webhook-signature`` for the team's own
service, verifiable with the Standard Webhooks reference libraries;
``signed_headers`` is the whole header set around it, shared by the ``http``
handler and ``listen``.
"""

from __future__ import annotations

import base64
import binascii
import hmac as stdlib_hmac
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from .errors import (
    ConfigError,
    InvalidSignature,
    InvalidSignatureHeader,
    MissingSignature,
    TimestampOutOfTolerance,
)
from .models import Event

HEADER = "x-lacuna-signature"
STANDARD_WEBHOOKS_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
DEFAULT_TOLERANCE_SECONDS = 300
# Bounds that keep a hostile header cheap to reject.
MAX_HEADER_LENGTH = 4096
MAX_SIGNATURES = 8
MAX_TIMESTAMP_DIGITS = 12
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_SIGNATURE_HEX_LENGTH = 64
#: The header as ``sign`` and Lacuna write it: ``t`` then one ``v1``, nothing else. It is read
#: with one match (``parse_header``); any other shape takes the item-by-item parse.
_CANONICAL = re.compile(
    rf"t=([0-9]{{1,{MAX_TIMESTAMP_DIGITS}}}),v1=([0-9a-fA-F]{{{_SIGNATURE_HEX_LENGTH}}})"
)


@dataclass(frozen=True, slots=True)
class ParsedHeader:
    """A syntactically valid signature header."""

    timestamp: int
    signatures: tuple[bytes, ...]


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode("utf-8")


def compute_signature(body: bytes, secret: str | bytes, timestamp: int) -> str:
    """Return the lowercase hex ``v1`` signature of ``body`` at ``timestamp``."""
    mac = HMAC(_secret_bytes(secret), hashes.SHA256())
    mac.update(b"%d." % timestamp)
    mac.update(body)
    return mac.finalize().hex()


def sign(body: bytes, secrets: str | Sequence[str], timestamp: int | None = None) -> str:
    """Return a complete header value signing ``body`` with every secret given.

    Several secrets produce several ``v1`` items, as the sender does while it
    rotates its secret.
    """
    if isinstance(secrets, str):
        secrets = [secrets]
    if not secrets:
        raise ConfigError("sign() needs at least one secret")
    ts = int(time.time()) if timestamp is None else timestamp
    items = [f"t={ts}"] + [f"v1={compute_signature(body, s, ts)}" for s in secrets]
    return ",".join(items)


def standard_webhooks_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_<base64>`` -> the decoded bytes.

    As in the reference libraries, the ``whsec_`` prefix is optional and the
    rest is standard base64, padding optional. Unlike them, any character
    outside the base64 alphabet is refused instead of silently skipped. Raises
    ``ValueError`` with a message that never contains the secret when the
    base64 is invalid or empty.
    """
    text = secret.strip().removeprefix(STANDARD_WEBHOOKS_SECRET_PREFIX).rstrip("=")
    try:
        padded = text + "=" * (-len(text) % 4)
        key = base64.b64decode(padded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(
            "is not a Standard Webhooks secret: expected whsec_ followed by base64"
        ) from None
    if not key:
        raise ValueError("is an empty Standard Webhooks secret")
    return key


def sign_standard_webhooks(msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """The ``webhook-signature`` value for one message (Standard Webhooks spec, SPEC §7).

    One ``v1,<base64 HMAC-SHA256>`` per key, space-separated, each over
    ``f"{msg_id}.{timestamp}.".encode() + body``; ``keys`` come from
    ``standard_webhooks_key``. Several keys sign for a receiver that is rotating
    its secret. ``timestamp`` is integer Unix seconds (the ``webhook-timestamp``).
    """
    if not keys:
        raise ConfigError("sign_standard_webhooks() needs at least one key")
    prefix = f"{msg_id}.{timestamp}.".encode()
    signatures = []
    for key in keys:
        mac = HMAC(key, hashes.SHA256())
        mac.update(prefix)
        mac.update(body)
        signatures.append("v1," + base64.b64encode(mac.finalize()).decode("ascii"))
    return " ".join(signatures)


def signed_headers(
    msg_id: str, event_type: str, body: bytes, keys: Sequence[bytes], timestamp: int
) -> dict[str, str]:
    """The headers that carry one signed message to the team's own app (SPEC §7), as the
    ``http`` handler and ``listen`` send it: ``content-type: application/json``, the Standard
    Webhooks ``webhook-id`` (``msg_id``: the event id), ``webhook-timestamp`` (``timestamp``,
    integer Unix seconds) and ``webhook-signature`` over ``body`` (left out without
    ``keys``: ``listen`` without ``--secret``), and ``lacuna-event-type``."""
    # An id or type the sender wrote with non-ASCII characters (intake takes them) goes
    # percent-encoded (UTF-8): a header value is ASCII, and no request could be built, every
    # attempt failing until the delivery died and the failures paused the handler. The
    # signature covers the id as sent.
    msg_id, event_type = header_text(msg_id), header_text(event_type)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "lacuna-event-type": event_type,
    }
    if keys:
        headers["webhook-signature"] = sign_standard_webhooks(msg_id, timestamp, body, keys)
    return headers


#: What a header value keeps as is: printable ASCII but the percent sign.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_text(value: str) -> str:
    """``value`` as an HTTP header value: itself when printable ASCII without ``%`` and
    without a space at either end, else with ``%``, every character that is not printable
    ASCII and the spaces at either end percent-encoded as UTF-8 (RFC 3986's form). A field
    value cannot begin or end with whitespace (RFC 9110 §5.5: h11 refuses to send one, and
    a type ``" job.completed "`` ended its forward dead). One-to-one: two different ids
    never give one ``webhook-id`` (with ``%`` kept as is, ``evt_é`` and ``evt_%C3%A9`` both
    gave ``evt_%C3%A9``, and a receiver dropping repeats by ``webhook-id`` dropped a real
    event)."""
    if value.isascii() and value.isprintable() and "%" not in value and value.strip(" ") == value:
        return value
    encoded = quote(value, safe=_HEADER_SAFE)
    inner = encoded.strip(" ")
    leading = len(encoded) - len(encoded.lstrip(" "))
    trailing = len(encoded) - len(encoded.rstrip(" ")) if inner else 0
    return "%20" * leading + inner + "%20" * trailing


def parse_header(header: str | None) -> ParsedHeader:
    """Parse a header value; raise ``MissingSignature`` or ``InvalidSignatureHeader``."""
    if header is not None:
        # The usual header, read in one match (a fifth of the time of the general parse);
        # it parses to exactly what the general parse makes of it.
        canonical = _CANONICAL.fullmatch(header)
        if canonical is not None:
            return ParsedHeader(
                timestamp=int(canonical.group(1)),
                signatures=(bytes.fromhex(canonical.group(2)),),
            )
    return _parse_items(header)


def _parse_items(header: str | None) -> ParsedHeader:
    """``parse_header`` for any shape of header: item by item."""
    if header is None or not header.strip():
        raise MissingSignature()
    if len(header) > MAX_HEADER_LENGTH:
        raise InvalidSignatureHeader("The x-lacuna-signature header is too long.")
    if not header.isascii():
        raise InvalidSignatureHeader("The x-lacuna-signature header must be ASCII.")
    timestamp: int | None = None
    signatures: list[bytes] = []
    for raw_item in header.split(","):
        item = raw_item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidSignatureHeader(
                "Each item of the x-lacuna-signature header must be key=value."
            )
        if key == "t":
            if timestamp is not None:
                raise InvalidSignatureHeader("The x-lacuna-signature header has more than one t.")
            if not value.isdigit() or len(value) > MAX_TIMESTAMP_DIGITS:
                raise InvalidSignatureHeader("t must be an integer number of Unix seconds.")
            timestamp = int(value)
        elif key == "v1":
            if len(value) != _SIGNATURE_HEX_LENGTH or not _HEX_DIGITS.issuperset(value):
                raise InvalidSignatureHeader("v1 must be 64 hexadecimal digits.")
            if len(signatures) >= MAX_SIGNATURES:
                raise InvalidSignatureHeader(
                    f"The x-lacuna-signature header has more than {MAX_SIGNATURES} v1 items."
                )
            signatures.append(bytes.fromhex(value))
        # Other schemes (v0, v2, ...) are ignored, as the contract says.
    if timestamp is None:
        raise InvalidSignatureHeader("The x-lacuna-signature header has no t item.")
    if not signatures:
        raise InvalidSignatureHeader("The x-lacuna-signature header has no v1 item.")
    return ParsedHeader(timestamp=timestamp, signatures=tuple(signatures))


# A keyed HMAC per secret, copied for each message: copying skips hashing the key again
# (about a third of the cost of checking a 1.5 KB body). Bounded: a process verifies
# against a handful of secrets (the current ones, during a rotation).
_KEYED: dict[bytes, HMAC] = {}
_KEYED_MAX = 64


def _keyed(secret: bytes) -> HMAC:
    base = _KEYED.get(secret)
    if base is None:
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        base = _KEYED[secret] = HMAC(secret, hashes.SHA256())
    return base.copy()


def _matches(msg_parts: Iterable[bytes], secret: bytes, signatures: Sequence[bytes]) -> bool:
    mac = _keyed(secret)
    for part in msg_parts:
        mac.update(part)
    if len(signatures) == 1:
        try:
            mac.verify(signatures[0])  # constant time
        except _CryptoInvalidSignature:
            return False
        return True
    digest = mac.finalize()
    # Compare against every candidate (no early exit) so timing reveals nothing.
    found = False
    for candidate in signatures:
        found |= stdlib_hmac.compare_digest(digest, candidate)
    return found


def verify(
    body: bytes,
    header: str | None,
    secrets: Sequence[str | bytes],
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> int:
    """Check ``header`` against ``body``; return the signed timestamp.

    Raises, in this order of checks: ``MissingSignature``,
    ``InvalidSignatureHeader``, ``TimestampOutOfTolerance`` (the window is
    both-sided: ``|now - t| > tolerance``), ``InvalidSignature`` (no ``v1``
    matches any secret).
    """
    if not secrets:
        raise ConfigError("verify() needs at least one secret")
    parsed = parse_header(header)
    if abs(now - parsed.timestamp) > tolerance:
        raise TimestampOutOfTolerance()
    prefix = b"%d." % parsed.timestamp
    for secret in secrets:
        if _matches((prefix, body), _secret_bytes(secret), parsed.signatures):
            return parsed.timestamp
    raise InvalidSignature()


def construct_event(
    body: bytes,
    header: str | None,
    secrets: str | Sequence[str],
    *,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> Event:
    """Verify a request and return its ``Event``: the twin of the SDK's ``constructEvent``.

    For users who verify inside their own application::

        event = construct_event(await request.body(),
                                request.headers.get("x-lacuna-signature"),
                                os.environ["LACUNA_WEBHOOK_SECRET"].split(","))

    Raises a ``SignatureError``, ``InvalidJSON`` or ``InvalidPayload``.
    """
    if isinstance(secrets, str):
        secrets = [secrets]
    verify(body, header, secrets, now=time.time() if now is None else now, tolerance=tolerance)
    return Event.from_body(body)
