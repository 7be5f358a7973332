"""Bearer-key check in constant time."""

from __future__ import annotations

import hmac


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def is_authorized(authorization: bytes | None, api_keys: tuple[str, ...]) -> bool:
    """True when no keys are set, or the header carries one of them.

    Every key is compared, with hmac.compare_digest, so the time taken does not tell which key or
    how much of it matched.
    """
    if not api_keys:
        return True
    token = bearer_token(authorization)
    if token is None:
        return False
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(token, key.encode())
    return matched
