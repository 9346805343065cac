"""Optional API keys: `Authorization: Bearer <key>` on every /v1 route.

Keys come from CENTER_EMBED_API_KEYS (comma-separated) and/or CENTER_EMBED_API_KEYS_FILE.
With none configured the API is open. Health, readiness, metrics and the docs stay open
either way. A key is never logged; the comparison takes the same time whichever key
matches, or whether one does (SHA-256 digests compared with hmac.compare_digest, so
neither the content nor the length of a key leaks through timing).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="an API key, when the service has keys")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


class KeyChecker:
    def __init__(self, keys: list[bytes]) -> None:
        self._digests = [hashlib.sha256(k).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        given = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        matches = [hmac.compare_digest(given, digest) for digest in self._digests]  # all of them
        return any(matches)


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    checker: KeyChecker = request.app.state.keys
    if not checker.enabled:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            ErrorCode.UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>", CHALLENGE
        )
    if not checker.accepts(credentials.credentials):
        raise ApiError(ErrorCode.UNAUTHORIZED, "invalid API key", CHALLENGE)
