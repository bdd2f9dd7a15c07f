"""The client side of OpenAI's server-sent events, for tests and load tests: ``data: <json>`` events, blank-line
separated, ending with ``data: [DONE]``. Comments (``: keep-alive``) and CRLF line ends are accepted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

DONE = "[DONE]"


class SseDecoder:
    """Turns bytes as they arrive into whole events' payloads: a JSON object each, or the string ``[DONE]``."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        # The buffer holds at most one unfinished event, so normalising it whole also joins a CR and LF that came
        # in different reads.
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        return [payload for payload in map(_payload, blocks) if payload is not None]

    def close(self) -> list[Any]:
        """The last event, if the stream ended without its blank line."""
        block, self._buffer = self._buffer, b""
        payload = _payload(block)
        return [] if payload is None else [payload]


def _payload(block: bytes) -> Any:
    data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None
    text = b"\n".join(data).decode("utf-8")
    return text if text == DONE else json.loads(text)


def parse_events(raw: bytes) -> list[Any]:
    """A whole SSE byte stream's payloads, in order."""
    decoder = SseDecoder()
    return decoder.feed(raw) + decoder.close()


async def aiter_events(response: httpx.Response) -> AsyncIterator[Any]:
    """The payloads of a streaming httpx response as they arrive."""
    decoder = SseDecoder()
    async for data in response.aiter_bytes():
        for payload in decoder.feed(data):
            yield payload
    for payload in decoder.close():
        yield payload
