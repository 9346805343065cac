"""Optional API keys: `Authorization: Bearer <key>` on every /v1 route.

Keys come from CENTER_EMBED_API_KEYS (comma-separated) and/or CENTER_EMBED_API_KEYS_FILE.
With none configured the API is open. Health, readiness, metrics and the docs stay open
either way. A key is never logged; the comparison takes the same time whichever key
matches, or whether one does (SHA-256 digests compared with hmac.compare_digest, so
neither the content nor the length of a key leaks through timing). The check itself is the
`require_key` dependency (service/deps.py).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import HTTPBearer

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
