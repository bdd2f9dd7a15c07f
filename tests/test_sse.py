"""SSE framing: one ``data:`` event per chunk, UTF-8 kept as is, and the parser reads back what the writer wrote."""

from __future__ import annotations

from deployments.openai import sse
from testkit.sse import SseDecoder, parse_events


def test_event_framing() -> None:
    raw = sse.event({"a": "blåbærgrød", "n": 1})
    assert raw == 'data: {"a":"blåbærgrød","n":1}\n\n'.encode()


def test_round_trip_with_done() -> None:
    raw = sse.event({"x": 1}) + sse.event({"y": "æ\nø"}) + sse.DONE
    assert parse_events(raw) == [{"x": 1}, {"y": "æ\nø"}, "[DONE]"]


def test_parser_accepts_crlf_and_ignores_comments() -> None:
    raw = b': keep-alive\r\n\r\ndata: {"z": 2}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert parse_events(raw) == [{"z": 2}, "[DONE]"]


def test_decoder_gives_each_event_once_whole_however_the_bytes_arrive() -> None:
    lf = sse.event({"a": "blåbær"}) + b": ping\n\n" + sse.event({"b": 2}) + sse.DONE
    for raw in (lf, lf.replace(b"\n", b"\r\n")):
        for size in (1, 2, 3, 7, len(raw)):
            decoder = SseDecoder()
            seen = [payload for i in range(0, len(raw), size) for payload in decoder.feed(raw[i : i + size])]
            assert seen + decoder.close() == [{"a": "blåbær"}, {"b": 2}, "[DONE]"], (raw, size)


def test_decoder_keeps_a_last_event_without_its_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: [DONE]') == [{"a": 1}]
    assert decoder.close() == ["[DONE]"]
