"""SSE framing: one ``data:`` event per chunk, UTF-8 kept as is, and the parser reads back what the writer wrote."""

from __future__ import annotations

from deployments.openai import sse


def test_event_framing() -> None:
    raw = sse.event({"a": "blåbærgrød", "n": 1})
    assert raw == 'data: {"a":"blåbærgrød","n":1}\n\n'.encode()


def test_round_trip_with_done() -> None:
    raw = sse.event({"x": 1}) + sse.event({"y": "æ\nø"}) + sse.DONE
    assert sse.parse_events(raw) == [{"x": 1}, {"y": "æ\nø"}, "[DONE]"]


def test_parser_accepts_crlf_and_ignores_comments() -> None:
    raw = b': keep-alive\r\n\r\ndata: {"z": 2}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert sse.parse_events(raw) == [{"z": 2}, "[DONE]"]
