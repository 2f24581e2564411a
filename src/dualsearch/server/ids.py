"""The one check for image ids arriving in requests (paths, query bodies)."""
from __future__ import annotations

from fastapi import HTTPException

INT64_MAX = 2**63 - 1  # SQLite's INTEGER (the catalog's vector ids) is a signed 64-bit number
_MAX_DIGITS = len(str(INT64_MAX))


def parse_id(value: object) -> int:
    """An image id as an int in ``0..2**63-1``: ASCII digits only for text (no signs, exponents,
    superscripts or other Unicode digits), an int within range otherwise; anything else is a 404
    "no such image"."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX:
        return value
    raise HTTPException(404, "no such image")
