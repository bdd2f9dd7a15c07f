"""Server-sent events framing for OpenAI streams: ``data: <json>\\n\\n`` events ending in ``data: [DONE]``.

Pure functions over bytes; they know nothing of requests, engines or errors beyond their wire form.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    # Compact separators and real UTF-8 (æ, ø, å stay one character each), one event per chunk.
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
