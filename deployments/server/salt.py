"""Each organisation's own prefix cache: vLLM keys cached blocks by the request's ``cache_salt`` too, so a salt per
organisation keeps one organisation's prompts from being timed against another's."""

from __future__ import annotations

import hashlib


def salt(owner: str) -> bytes:
    return hashlib.blake2b(owner.encode("utf-8"), digest_size=16, person=b"anker-cache-salt").digest()


def cache_salt(owner: str) -> str:
    """vLLM's ``cache_salt`` for ``owner``'s own prefix cache: a digest of the owner, not its name."""
    return salt(owner).hex()
