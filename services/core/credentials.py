"""Random secrets (enrollment tokens, agent keys, API tokens) and their stored digests.

Each secret carries a short prefix that names its kind, so a secret pasted in
the wrong place is easy to spot. Only ``hash_secret`` digests are stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ENROLLMENT_TOKEN_PREFIX = "amenr_"
AGENT_KEY_PREFIX = "amkey_"
API_TOKEN_PREFIX = "amapi_"

SECRET_BYTES = 32
"""Random bytes in each secret (256 bits)."""

DISPLAY_PREFIX_LENGTH = 12
"""Characters of a secret that may be shown and logged: the kind prefix and 6 random ones."""


def new_secret(prefix: str) -> str:
    """Return ``prefix`` followed by 256 random bits in URL-safe base64."""
    return prefix + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> bytes:
    """Return the SHA-256 digest of ``secret``.

    A plain hash is enough because the secrets are 256-bit random values, so
    there is nothing for a key derivation function to slow down.
    """
    return hashlib.sha256(secret.encode("utf-8")).digest()


def secret_matches(secret: str, digest: bytes) -> bool:
    """Tell whether ``secret`` hashes to ``digest``, comparing in constant time."""
    return hmac.compare_digest(hash_secret(secret), bytes(digest))


def display_prefix(secret: str) -> str:
    """Return the first 12 characters of ``secret``, which are safe to show and log."""
    return secret[:DISPLAY_PREFIX_LENGTH]
