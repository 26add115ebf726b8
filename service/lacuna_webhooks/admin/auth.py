"""Who may use the admin listener (SPEC §9): bearer tokens, the console's session cookie,
and CSRF tokens for the console's forms.

Tokens are compared in constant time through their SHA-256 digests, so neither a token's
content nor its length shows in the timing. The session cookie is stateless: an expiry and
an HMAC of it keyed by the token that signed in, so it survives restarts, holds across
replicas, and dies with its token when the token is rotated out of ``LACUNA_ADMIN_TOKEN``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

from ..config import Secret

#: The console's session cookie (HttpOnly, SameSite=Strict; Secure when served over TLS).
SESSION_COOKIE = "lacuna_session"
#: How long a console sign-in lasts, in seconds.
SESSION_SECONDS = 12 * 3600
#: Query parameters that look like a credential: refused (400), never read (a token in a
#: URL ends up in proxy logs and browser history).
TOKEN_QUERY_NAMES = frozenset({"token", "access_token", "api_key", "apikey", "auth"})


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def matching_token(presented: str, tokens: Sequence[Secret]) -> Secret | None:
    """The configured token equal to ``presented`` (every token compared, in constant
    time), or ``None``."""
    wanted = _digest(presented)
    found: Secret | None = None
    for token in tokens:
        if hmac.compare_digest(wanted, _digest(token.reveal())):
            found = token
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _mac(token: Secret, message: str) -> str:
    key = _digest("lacuna-webhooks admin session:" + token.reveal())
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def make_session(token: Secret, *, now: float | None = None) -> str:
    """A session cookie value for a console sign-in with ``token``: ``<expiry>.<mac>``."""
    expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{expiry}.{_mac(token, f'session:{expiry}')}"


def session_token(
    cookie: str | None, tokens: Sequence[Secret], *, now: float | None = None
) -> Secret | None:
    """The token that signed a valid, unexpired session cookie, else ``None``."""
    if not cookie:
        return None
    expiry_text, _, mac = cookie.partition(".")
    # isascii too: "²".isdigit() holds and int("²") raises (a 500 from any cookie).
    if not (expiry_text.isascii() and expiry_text.isdigit()) or len(expiry_text) > 12 or not mac:
        return None
    if int(expiry_text) <= (time.time() if now is None else now):
        return None
    found: Secret | None = None
    for token in tokens:
        if hmac.compare_digest(mac.encode(), _mac(token, f"session:{expiry_text}").encode()):
            found = token
    return found


def csrf_token(session: str, token: Secret) -> str:
    """The CSRF token of a session: every state-changing console form carries it."""
    return _mac(token, f"csrf:{session}")


def csrf_ok(session: str, token: Secret, presented: str | None) -> bool:
    """Whether ``presented`` is the CSRF token of ``session`` (constant time)."""
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), csrf_token(session, token).encode()
    )


__all__ = [
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "TOKEN_QUERY_NAMES",
    "bearer_token",
    "csrf_ok",
    "csrf_token",
    "make_session",
    "matching_token",
    "session_token",
]
