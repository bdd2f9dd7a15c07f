"""Request ids that sort by the time they were made: the billing id of every call (``chatcmpl-<id>``), which is also
the usage ledger's primary key.

32 hex digits, as a UUID's: the milliseconds since the epoch (12 digits, enough until the year 10889), then 80
random bits (20 digits), the layout of a version-7 UUID. Ids made one after another land next to each other in the
ledger's primary-key index, so an insert touches the index's last pages instead of a random one of them. With
random ids (``uuid4``) each insert reads and rewrites a page anywhere in the index: measured on SQLite, the ledger's
CPU an event grew from 18 to 33 µs as it reached 650,000 rows; with these it stays at 13-15 µs. PostgreSQL's B-tree
behaves alike. Two ids of the same millisecond collide with odds of 2^-80 a pair.

The time is the request's own, which its client sees in the answer's ``id`` anyway (``created``): nothing else is
in an id.
"""

from __future__ import annotations

import os
import time

RANDOM_BYTES = 10  # 80 bits


def new_request_id() -> str:
    """32 lower-case hex digits that sort after those made in an earlier millisecond."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(RANDOM_BYTES).hex()}"
