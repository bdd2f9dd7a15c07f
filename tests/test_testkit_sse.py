"""The test kit's SSE client (testkit/sse.py), which the tests and load tests read every stream with: each event
once and whole however the bytes arrive, UTF-8 kept as is, CRLF and comments as the SSE standard has them."""

from __future__ import annotations

from testkit.sse import SseDecoder, parse_events


def event(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


DONE = event("[DONE]")


def test_events_and_done_are_read_back_with_their_utf8() -> None:
    raw = event('{"x":1}') + event('{"y":"æ\\nø"}') + DONE
    assert parse_events(raw) == [{"x": 1}, {"y": "æ\nø"}, "[DONE]"]


def test_crlf_and_comments_are_taken() -> None:
    raw = b': keep-alive\r\n\r\ndata: {"z": 2}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert parse_events(raw) == [{"z": 2}, "[DONE]"]


def test_decoder_gives_each_event_once_whole_however_the_bytes_arrive() -> None:
    lf = event('{"a":"blåbær"}') + b": ping\n\n" + event('{"b":2}') + DONE
    for raw in (lf, lf.replace(b"\n", b"\r\n")):
        for size in (1, 2, 3, 7, len(raw)):
            decoder = SseDecoder()
            seen = [payload for i in range(0, len(raw), size) for payload in decoder.feed(raw[i : i + size])]
            assert seen + decoder.close() == [{"a": "blåbær"}, {"b": 2}, "[DONE]"], (raw, size)


def test_decoder_keeps_a_last_event_without_its_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: [DONE]') == [{"a": 1}]
    assert decoder.close() == ["[DONE]"]
