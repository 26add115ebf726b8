"""signature.py: SPEC §1 exactly, the published test vectors, and a total header parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lacuna_webhooks.errors import (
    InvalidJSON,
    InvalidSignature,
    InvalidSignatureHeader,
    MissingSignature,
    SignatureError,
    TimestampOutOfTolerance,
)
from lacuna_webhooks.signature import (
    compute_signature,
    construct_event,
    parse_header,
    sign,
    sign_standard_webhooks,
    standard_webhooks_key,
    verify,
)

SECRET = "whsec_test_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"
ROTATED = "whsec_test_rotated_new_secret_value_0002"
T = 1763731200
BODY = (
    b'{"id":"evt_1QmZ8xLacuna0001","object":"event","type":"job.completed","created":1763731200,'
    b'"data":{"id":"cm123abc","object":"music.generation","status":"ready","title":"Late Night '
    b'Study","style":"lofi hip hop, mellow piano, 70 bpm","instrumental":true,"tracks":[{"id":'
    b'"trk_01","audio_url":"https://cdn.lacuna.example/tracks/trk_01.mp3","duration":182.4,'
    b'"lyrics":null}]}}'
)
V1 = "a54d57021f6c1ffde61a69e89997ed78e80cd3f9e9f0d77bd641be8e6338a217"
V1_ROTATED = "de158926210b7c7a3339e173f931c47984bed311ad010915ccfb4190788ab0eb"


def test_vector_body_is_369_bytes() -> None:
    """The SPEC's test body is exactly 369 bytes (guards against a mistyped fixture)."""
    assert len(BODY) == 369


def test_spec_test_vector() -> None:
    """HMAC-SHA256 of ``t.`` + raw body, keyed with the whole secret, gives the SPEC value."""
    assert compute_signature(BODY, SECRET, T) == V1
    assert sign(BODY, SECRET, T) == f"t={T},v1={V1}"


def test_spec_rotation_vector() -> None:
    """Signing with new and old secret gives the SPEC's two-signature header, new first."""
    assert sign(BODY, [ROTATED, SECRET], T) == f"t={T},v1={V1_ROTATED},v1={V1}"


def test_verify_accepts_vector_and_returns_timestamp() -> None:
    assert verify(BODY, f"t={T},v1={V1}", [SECRET], now=T) == T


@pytest.mark.parametrize("configured", [[SECRET], [ROTATED], [ROTATED, SECRET], ["x", SECRET]])
def test_any_v1_matching_any_secret_is_authentic(configured: list[str]) -> None:
    """During rotation the header carries both signatures; either configured secret suffices."""
    header = f"t={T},v1={V1_ROTATED},v1={V1}"
    assert verify(BODY, header, configured, now=T) == T


def test_whitespace_unknown_schemes_and_case_are_tolerated() -> None:
    """Spaces around items and unknown schemes are ignored; uppercase hex is read as hex."""
    header = f"  v0=deadbeef , t={T} ,v2=zzz, v1={V1.upper()} "
    assert verify(BODY, header, [SECRET], now=T) == T


def test_one_byte_changed_is_rejected() -> None:
    """The raw bytes are signed: re-serialised or altered JSON does not verify."""
    with pytest.raises(InvalidSignature):
        verify(BODY.replace(b"182.4", b"182.5"), f"t={T},v1={V1}", [SECRET], now=T)
    with pytest.raises(InvalidSignature):
        verify(BODY + b"\n", f"t={T},v1={V1}", [SECRET], now=T)


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(InvalidSignature):
        verify(BODY, f"t={T},v1={V1}", ["whsec_other"], now=T)


def test_prefix_is_part_of_the_key() -> None:
    """Nothing is decoded: the secret without its ``whsec_`` prefix is a different key."""
    with pytest.raises(InvalidSignature):
        verify(BODY, f"t={T},v1={V1}", [SECRET.removeprefix("whsec_")], now=T)


@pytest.mark.parametrize("skew", [301, -301, 10**6, -(10**6)])
def test_window_is_both_sided(skew: int) -> None:
    """Too old and too far in the future are both refused, before the signature is checked."""
    with pytest.raises(TimestampOutOfTolerance):
        verify(BODY, f"t={T},v1={V1}", [SECRET], now=T + skew)


@pytest.mark.parametrize("skew", [300, -300, 0])
def test_window_edges_are_inclusive(skew: int) -> None:
    assert verify(BODY, f"t={T},v1={V1}", [SECRET], now=T + skew) == T


def test_tolerance_is_configurable() -> None:
    with pytest.raises(TimestampOutOfTolerance):
        verify(BODY, f"t={T},v1={V1}", [SECRET], now=T + 11, tolerance=10)


def test_timestamp_checked_before_signature() -> None:
    """SPEC order: an old request with a bad signature is reported as out of tolerance."""
    with pytest.raises(TimestampOutOfTolerance):
        verify(BODY, f"t={T},v1={'0' * 64}", [SECRET], now=T + 1000)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(header: str | None) -> None:
    with pytest.raises(MissingSignature):
        verify(BODY, header, [SECRET], now=T)


@pytest.mark.parametrize(
    "header",
    [
        f"v1={V1}",  # no t
        f"t={T}",  # no v1
        f"t={T},v0={V1}",  # only unknown schemes
        f"t={T},t={T},v1={V1}",  # repeated t
        f"t=abc,v1={V1}",
        f"t=-5,v1={V1}",
        f"t=1.5,v1={V1}",
        f"t=,v1={V1}",
        f"t={'9' * 40},v1={V1}",
        f"t={T},v1=xyz",
        f"t={T},v1={V1[:-1]}",  # 63 digits
        f"t={T},v1={V1}00",  # too long
        f"t={T},v1",  # no =
        f"t={T},=abc,v1={V1}",  # empty key
        f"t={T},v1={V1}," + ",".join([f"v1={V1}"] * 20),  # too many signatures
        f"t={T},v1={V1}é",  # non-ASCII
        f"t=١٢٣,v1={V1}",  # non-ASCII digits
        "t=1," + "x" * 10_000,  # huge
    ],
)
def test_malformed_headers(header: str) -> None:
    with pytest.raises(InvalidSignatureHeader):
        verify(BODY, header, [SECRET], now=T)


def test_empty_items_are_ignored() -> None:
    assert parse_header(f",,t={T},,v1={V1},").timestamp == T


@settings(max_examples=500, deadline=None)
@given(header=st.text(max_size=300))
def test_parser_is_total_on_any_text(header: str) -> None:
    """No header value raises anything but our own SignatureError subclasses."""
    with contextlib.suppress(SignatureError):
        verify(BODY, header, [SECRET], now=T)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(["t", "v1", "v0", "T", " v1", "", "t "]),
            st.one_of(
                st.just(str(T)),
                st.just(V1),
                st.text(alphabet="0123456789abcdef", max_size=70),
                st.text(max_size=20),
            ),
        ),
        max_size=12,
    ),
    body=st.binary(max_size=200),
)
def test_verifier_is_total_on_structured_headers(items: list[tuple[str, str]], body: bytes) -> None:
    """Near-valid headers and arbitrary bodies: authentic only when a v1 really matches."""
    header = ",".join(f"{k}={v}" for k, v in items)
    try:
        verify(body, header, [SECRET], now=T)
    except SignatureError:
        return
    # If it verified, one of the v1 values really is the signature of this body.
    assert compute_signature(body, SECRET, T) in {v.lower() for k, v in items}


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=2000), t=st.integers(min_value=0, max_value=10**11))
def test_sign_then_verify_roundtrip(body: bytes, t: int) -> None:
    assert verify(body, sign(body, SECRET, t), [SECRET], now=t) == t


def test_construct_event_returns_parsed_event() -> None:
    """The Python twin of the SDK's constructEvent verifies, then parses."""
    event = construct_event(BODY, f"t={T},v1={V1}", SECRET, now=T)
    assert event.id == "evt_1QmZ8xLacuna0001"
    assert event.type == "job.completed"
    assert event.task_id == "cm123abc"
    assert event.raw == BODY


def test_construct_event_refuses_before_parsing() -> None:
    """Unauthenticated bytes are never parsed: a bad signature wins over bad JSON."""
    with pytest.raises(InvalidSignature):
        construct_event(b"not json", f"t={T},v1={V1}", SECRET, now=T)
    good = sign(b"not json", SECRET, T)
    with pytest.raises(InvalidJSON):
        construct_event(b"not json", good, SECRET, now=T)


# --- Standard Webhooks signing (the http handler, SPEC §7) ----------------------------------

SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_BODY = b'{"test": 2432232314}'


def test_standard_webhooks_signature_matches_the_spec_vector() -> None:
    """The Standard Webhooks reference test vector (msg_p5jX…, 1614265330)."""
    key = standard_webhooks_key(SW_SECRET)
    assert sign_standard_webhooks(SW_ID, SW_TIMESTAMP, SW_BODY, [key]) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_standard_webhooks_several_keys_give_space_separated_signatures() -> None:
    """One v1 signature per key, in the order given, joined by spaces."""
    first = standard_webhooks_key(SW_SECRET)
    second = standard_webhooks_key("whsec_" + "QUJD" * 8)
    both = sign_standard_webhooks(SW_ID, SW_TIMESTAMP, SW_BODY, [first, second])
    one, two = both.split(" ")
    assert one == sign_standard_webhooks(SW_ID, SW_TIMESTAMP, SW_BODY, [first])
    assert two == sign_standard_webhooks(SW_ID, SW_TIMESTAMP, SW_BODY, [second])
    assert one != two


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("whsec_QUJD", b"ABC"),
        ("QUJD", b"ABC"),  # the prefix is optional, as in the reference libraries
        ("whsec_QUI", b"AB"),  # padding optional too
        ("whsec_QUI=", b"AB"),
        ("  whsec_QUJD  ", b"ABC"),
    ],
)
def test_standard_webhooks_key_decodes_base64(secret: str, key: bytes) -> None:
    assert standard_webhooks_key(secret) == key


@pytest.mark.parametrize("secret", ["whsec_", "whsec_Q", "whsec_QU J", "whsec_é", "whsec_QU-_"])
def test_standard_webhooks_key_refuses_bad_base64_without_echoing_it(secret: str) -> None:
    """Empty, truncated, spaced, non-ASCII or url-safe base64: ValueError, secret not shown."""
    with pytest.raises(ValueError, match="Standard Webhooks secret") as caught:
        standard_webhooks_key(secret)
    assert secret.removeprefix("whsec_") not in str(caught.value) or secret == "whsec_"


def _parsed_or_error(parse: object, header: str) -> object:
    try:
        return parse(header)  # type: ignore[operator]
    except SignatureError as exc:
        return (type(exc), str(exc))


@settings(max_examples=500)
@given(
    t=st.one_of(
        st.text(alphabet="0123456789", min_size=1, max_size=14),
        st.text(alphabet="0123456789\u0661\u0662 x-+", max_size=14),
    ),
    v1=st.one_of(
        st.text(alphabet="0123456789abcdefABCDEFgG ", min_size=60, max_size=66),
        st.just(V1),
        st.just(V1.upper()),
    ),
    shape=st.sampled_from(["t={t},v1={v1}", "t={t},v1={v1}\n", " t={t},v1={v1}", "v1={v1},t={t}"]),
)
@example(t="9" * 12, v1=V1, shape="t={t},v1={v1}")
@example(t="1" * 13, v1=V1, shape="t={t},v1={v1}")
@example(t="0", v1=V1.upper(), shape="t={t},v1={v1}")
@example(t="\u0661" + str(T), v1=V1, shape="t={t},v1={v1}")
@example(t=str(T), v1=V1, shape="t={t},v1={v1}\n")
@example(t=str(T), v1=V1[:-1], shape="t={t},v1={v1}")
def test_the_one_match_read_of_the_usual_header_parses_as_the_general_parse(
    t: str, v1: str, shape: str
) -> None:
    """``parse_header`` reads the usual ``t=…,v1=…`` in one match: whatever it reads that
    way (or refuses) must be exactly what the item-by-item parse makes of the same text."""
    from lacuna_webhooks.signature import _parse_items

    header = shape.format(t=t, v1=v1)
    assert _parsed_or_error(parse_header, header) == _parsed_or_error(_parse_items, header)
