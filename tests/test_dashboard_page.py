"""The customer dashboard in real headless Chromium, served by the real dashboard router over real HTTP (uvicorn).

The usage API is a double (its numbers are not what is measured here); checked are the page's numbers and display
rule, the chart, sign-in/out and errors, that nothing leaves the origin, and the router's allow-list and headers.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from playwright.sync_api import ConsoleMessage, Page
from playwright.sync_api import Request as BrowserRequest
from starlette.responses import JSONResponse

from deployments.dashboard import SECURITY_HEADERS, router
from tests.browser import chromium_page, sign_in, wait_for_state

KEY = "ank_dashboard_test_key"
KEY_WITHOUT_BUDGET = "ank_dashboard_no_budget"
KEY_ONCE_UNAVAILABLE = "ank_dashboard_once_unavailable"
UNAVAILABLE_MESSAGE = "The usage service is starting; try again shortly."
BAD_KEY_MESSAGE = "Incorrect API key provided. You can create a key with `anker keys create --tenant NAME`."
MONTH_START = "2026-11-01T00:00:00Z"
MONTH_END = "2026-12-01T00:00:00Z"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'"
)


def usage_row(
    start: str, end: str, model: str | None, counts: tuple[int, int, int, int], costs: tuple[str, str, str]
) -> dict[str, Any]:
    requests, uncached, cached, output = counts
    cost_uncached, cost_cached, cost_output = costs
    return {
        "start": start,
        "end": end,
        "model": model,
        "requests": requests,
        "input_uncached_tokens": uncached,
        "input_cached_tokens": cached,
        "output_tokens": output,
        "cost_dkk": str(Decimal(cost_uncached) + Decimal(cost_cached) + Decimal(cost_output)),
        "cost_input_uncached_dkk": cost_uncached,
        "cost_input_cached_dkk": cost_cached,
        "cost_output_dkk": cost_output,
    }


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = ("requests", "input_uncached_tokens", "input_cached_tokens", "output_tokens")
    costs = ("cost_dkk", "cost_input_uncached_dkk", "cost_input_cached_dkk", "cost_output_dkk")
    summed: dict[str, Any] = {name: sum(row[name] for row in rows) for name in counts}
    summed.update({name: str(sum((Decimal(row[name]) for row in rows), Decimal(0))) for name in costs})
    return summed


# Three days of one month: a big day (2 decimals, thousands separators), a mid one, and the brief's tiny example.
BIG = ((1000, 1_000_000, 200_000, 50_000), ("600.000000", "60.000000", "574.500000"))
MID = ((40, 12_345, 0, 2_000), ("7.407000", "0", "22.980000"))
TINY = ((3, 10, 16, 30), ("0.00006", "0.000048", "0.00135"))
DAYS = [
    usage_row("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", None, *BIG),
    usage_row("2026-11-15T00:00:00Z", "2026-11-16T00:00:00Z", None, *MID),
    usage_row("2026-11-26T00:00:00Z", "2026-11-27T00:00:00Z", None, *TINY),
]
MODELS = [
    {**totals([usage_row("", "", None, *BIG), usage_row("", "", None, *TINY)]), "model": "qwen3-next-tiny"},
    {**totals([usage_row("", "", None, *MID)]), "model": "qwen3-moe-tiny"},
]
MODELS = [{"start": MONTH_START, "end": MONTH_END, **row} for row in MODELS]
BUDGET = {
    "scope": "tenant",
    "kind": "monthly",
    "limit_dkk": "2000.00",
    "spent_dkk": "1264.888458",
    "reserved_dkk": "0",
    "left_dkk": "735.111542",
}


class UsageApiDouble:
    """Stands in for /v1/usage/summary and /v1/usage: fixed JSON for known keys, OpenAI's 401 shape for any other.

    It records each call (path, query, Authorization header), answers 400 to a window other than the month's, and
    one 503 to the first summary asked with ``KEY_ONCE_UNAVAILABLE``.
    """

    def __init__(self) -> None:
        self.budgets: dict[str, dict[str, str] | None] = {
            KEY: BUDGET,
            KEY_WITHOUT_BUDGET: None,
            KEY_ONCE_UNAVAILABLE: BUDGET,
        }
        self.calls: list[tuple[str, str, str]] = []
        self.unavailable_once = {KEY_ONCE_UNAVAILABLE}

    def summary(self, key: str) -> dict[str, Any]:
        return {
            "object": "usage.summary",
            "tenant": "acme",
            "key_id": "3f2a9c1b7d4e",
            "role": "member",
            "month": "2026-11",
            "month_start": MONTH_START,
            "month_end": MONTH_END,
            "plan": {"name": "monthly", "monthly_fee_dkk": "500.00", "discount_percent": "10"},
            "budget": self.budgets[key],
            "totals": totals(DAYS),
        }

    def _key(self, request: Request) -> str | None:
        self.calls.append((request.url.path, request.url.query, request.headers.get("authorization", "")))
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return key if scheme == "Bearer" and key in self.budgets else None

    @staticmethod
    def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    def router(self) -> APIRouter:
        routes = APIRouter()
        unauthorized = (401, BAD_KEY_MESSAGE, "invalid_request_error", "invalid_api_key")

        @routes.get("/v1/usage/summary")
        async def usage_summary(request: Request) -> JSONResponse:
            key = self._key(request)
            if key is None:
                return self._error(*unauthorized)
            if key in self.unavailable_once:
                self.unavailable_once.discard(key)
                return self._error(503, UNAVAILABLE_MESSAGE, "server_error", "service_unavailable")
            return JSONResponse(self.summary(key))

        @routes.get("/v1/usage")
        async def usage(request: Request, start: str, end: str, group_by: str) -> JSONResponse:
            if self._key(request) is None:
                return self._error(*unauthorized)
            if (start, end) != (MONTH_START, MONTH_END) or group_by not in ("day", "model"):
                return self._error(400, "Unexpected usage window.", "invalid_request_error", None, "start")
            rows = DAYS if group_by == "day" else MODELS
            body = {"object": "list", "group_by": group_by, "start": start, "end": end, "data": rows}
            return JSONResponse({**body, "totals": totals(rows)})

        return routes


@dataclass(frozen=True)
class PageServer:
    base_url: str
    host: str
    port: int
    usage: UsageApiDouble


@pytest.fixture(scope="module")
def server() -> Iterator[PageServer]:
    usage = UsageApiDouble()
    app = FastAPI()
    app.include_router(router())
    app.include_router(usage.router())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard test server did not start")
        time.sleep(0.02)
    try:
        yield PageServer(f"http://127.0.0.1:{port}", "127.0.0.1", port, usage)
    finally:
        uv.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Page]:
    with chromium_page() as page:
        yield page


@pytest.fixture
def page(browser_page: Page) -> Iterator[Page]:
    """A new tab per test: its own sessionStorage, in the module's one Chromium."""
    tab = browser_page.context.new_page()
    try:
        yield tab
    finally:
        tab.close()


def shown(page: Page, selector: str) -> tuple[str | None, str | None]:
    """The text an element shows and the raw API value it carries."""
    return page.text_content(selector), page.get_attribute(selector, "data-value")


def test_sign_in_shows_the_month_in_danish_kroner(page: Page, server: PageServer) -> None:
    server.usage.calls.clear()
    sign_in(page, server.base_url, KEY)

    assert page.text_content("#tenant") == "acme"
    assert shown(page, "#month") == ("November 2026", "2026-11")
    assert shown(page, "#total-dkk") == ("1.264,89 kr", "1264.888458")
    assert shown(page, "#requests") == ("1.043", "1043")
    assert shown(page, "#tokens-uncached") == ("1.012.355", "1012355")
    assert shown(page, "#tokens-cached") == ("200.016", "200016")
    assert shown(page, "#tokens-output") == ("52.030", "52030")
    assert shown(page, "#cost-uncached") == ("607,41 kr", "607.407060")
    assert shown(page, "#cost-cached") == ("60,00 kr", "60.000048")
    assert shown(page, "#cost-output") == ("597,48 kr", "597.481350")
    assert shown(page, "#budget-left") == ("735,11 kr", "735.111542")
    assert shown(page, "#budget-limit") == ("2.000,00 kr", "2000.00")
    assert shown(page, "#budget-spent") == ("1.264,89 kr", "1264.888458")
    assert shown(page, "#budget-reserved") == ("0,0000 kr", "0")
    assert page.text_content("#plan-name") == "monthly"
    assert shown(page, "#plan-fee") == ("500,00 kr", "500.00")
    assert shown(page, "#plan-discount") == ("10 %", "10")

    rows = page.eval_on_selector_all(
        "#by-model tbody tr", "rows => rows.map(r => [...r.cells].map(c => [c.textContent, c.dataset.value ?? null]))"
    )
    assert rows == [
        [
            ["qwen3-next-tiny", None],
            ["1.003", "1003"],
            ["1.000.010", "1000010"],
            ["200.016", "200016"],
            ["50.030", "50030"],
            ["1.234,50 kr", "1234.501458"],
        ],
        [
            ["qwen3-moe-tiny", None],
            ["40", "40"],
            ["12.345", "12345"],
            ["0", "0"],
            ["2.000", "2000"],
            ["30,39 kr", "30.387000"],
        ],
    ]

    window = "start=2026-11-01T00%3A00%3A00Z&end=2026-12-01T00%3A00%3A00Z"
    assert sorted(server.usage.calls) == sorted(
        [
            ("/v1/usage/summary", "", f"Bearer {KEY}"),
            ("/v1/usage", f"{window}&group_by=day", f"Bearer {KEY}"),
            ("/v1/usage", f"{window}&group_by=model", f"Bearer {KEY}"),
        ]
    )


def test_daily_chart_has_one_titled_bar_per_day_in_order(page: Page, server: PageServer) -> None:
    sign_in(page, server.base_url, KEY)

    bars = page.eval_on_selector_all(
        "#daily-chart svg rect",
        """bars => bars.map(b => ({
            day: b.dataset.day, value: b.dataset.value, x: b.x.baseVal.value, height: b.height.baseVal.value,
            title: b.querySelector('title').textContent}))""",
    )
    assert [bar["day"] for bar in bars] == ["2026-11-02", "2026-11-15", "2026-11-26"]
    assert [bar["value"] for bar in bars] == [row["cost_dkk"] for row in DAYS]
    assert bars[0]["x"] < bars[1]["x"] < bars[2]["x"]
    assert bars[0]["height"] > bars[1]["height"] > bars[2]["height"] >= 1
    assert [bar["title"] for bar in bars] == [
        "2 November 2026: 1.234,50 kr, 1.000 requests, 1.250.000 tokens",
        "15 November 2026: 30,39 kr, 40 requests, 14.345 tokens",
        "26 November 2026: 0,0015 kr, 3 requests, 56 tokens",
    ]


def test_without_a_budget_the_page_says_so(page: Page, server: PageServer) -> None:
    sign_in(page, server.base_url, KEY_WITHOUT_BUDGET)

    assert shown(page, "#budget-left") == ("No budget set", None)
    assert not page.is_visible("#budget-details")
    assert shown(page, "#total-dkk") == ("1.264,89 kr", "1264.888458")


def test_wrong_key_shows_the_api_message_and_is_forgotten(page: Page, server: PageServer) -> None:
    page.goto(f"{server.base_url}/dashboard")
    page.fill("#api-key", "ank_wrong")
    page.click("#sign-in")

    assert wait_for_state(page, ("ready", "error")) == "error"
    assert page.text_content("#error") == BAD_KEY_MESSAGE
    assert page.is_visible("#error") and page.is_visible("#api-key")
    assert not page.is_visible("#sign-out")
    assert page.evaluate("() => sessionStorage.length") == 0
    with pytest.raises(RuntimeError, match="Incorrect API key provided"):
        sign_in(page, server.base_url, "ank_wrong_again")


def test_other_errors_keep_the_key_and_offer_a_retry(page: Page, server: PageServer) -> None:
    page.goto(f"{server.base_url}/dashboard")
    page.fill("#api-key", KEY_ONCE_UNAVAILABLE)
    page.click("#sign-in")

    assert wait_for_state(page, ("ready", "error")) == "error"
    assert page.text_content("#error") == UNAVAILABLE_MESSAGE
    assert page.is_visible("#retry") and page.is_visible("#sign-out") and not page.is_visible("#api-key")
    assert page.evaluate("() => Object.values(sessionStorage)") == [KEY_ONCE_UNAVAILABLE]

    page.click("#retry")
    assert wait_for_state(page, ("ready", "error")) == "ready"
    assert shown(page, "#total-dkk") == ("1.264,89 kr", "1264.888458")
    assert not page.is_visible("#error")


def test_key_lives_in_session_storage_only_until_sign_out(page: Page, server: PageServer) -> None:
    sign_in(page, server.base_url, KEY)
    stored = page.evaluate(
        "() => [Object.values(sessionStorage), localStorage.length, document.cookie, "
        "document.getElementById('api-key').value]"
    )
    assert stored == [[KEY], 0, "", ""]

    page.reload()
    assert wait_for_state(page, ("ready", "error")) == "ready"
    assert shown(page, "#total-dkk") == ("1.264,89 kr", "1264.888458")

    page.click("#sign-out")
    assert wait_for_state(page, ("signed-out",)) == "signed-out"
    assert page.evaluate("() => sessionStorage.length") == 0
    assert page.is_visible("#api-key") and not page.is_visible("#dashboard-view")
    assert shown(page, "#total-dkk") == ("", None)
    assert page.eval_on_selector_all("#daily-chart rect, #by-model tbody tr", "found => found.length") == 0


def test_page_talks_only_to_its_own_origin_without_errors(page: Page, server: PageServer) -> None:
    urls: list[str] = []
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    def on_request(request: BrowserRequest) -> None:
        urls.append(request.url)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    sign_in(page, server.base_url, KEY)
    page.hover("#daily-chart rect")  # hover styles must not fetch anything either

    assert urls, "the page made no requests at all"
    assert all(url.startswith(f"{server.base_url}/") for url in urls), urls
    paths = {url.removeprefix(server.base_url).split("?")[0] for url in urls}
    assert paths == {"/dashboard", "/dashboard/app.js", "/dashboard/style.css", "/v1/usage/summary", "/v1/usage"}
    assert problems == []  # a CSP violation (inline script/style, other origin) would be reported here


def test_screenshot_of_the_signed_in_page(page: Page, server: PageServer, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    sign_in(page, server.base_url, KEY)

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)

    assert shot.stat().st_size > 0
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_format_dkk_display_rule(page: Page, server: PageServer) -> None:
    page.goto(f"{server.base_url}/dashboard")
    wait_for_state(page, ("signed-out",))
    cases = {
        "0.001458": "0,0015 kr",
        "1234.5": "1.234,50 kr",
        "0": "0,0000 kr",
        "99.998590": "100,00 kr",
        "1": "1,00 kr",
        "0.99995": "1,0000 kr",  # below 1 kr before rounding, so four decimals
        "0.99994999": "0,9999 kr",
        "0.00005": "0,0001 kr",  # half rounds up
        "0.0000499999": "0,0000 kr",
        "0.00135": "0,0014 kr",
        "0.000048": "0,0000 kr",
        "999.995": "1.000,00 kr",
        "1000000": "1.000.000,00 kr",
        "-1234.565": "-1.234,57 kr",  # half-up on the absolute amount
        "-0.00001": "0,0000 kr",  # no minus on a zero
        "-0.5": "-0,5000 kr",
        "12345678901234567890.125": "12.345.678.901.234.567.890,13 kr",  # beyond float precision
        "0.000000001": "0,0000 kr",
        "1E+3": "1.000,00 kr",
        "0E-9": "0,0000 kr",
        ".5": "0,5000 kr",
        "500.00": "500,00 kr",
    }
    assert page.evaluate("cases => cases.map(formatDkk)", list(cases)) == list(cases.values())
    counts = {"0": "0", "999": "999", "1000": "1.000", "12345": "12.345", "1012355": "1.012.355"}
    assert page.evaluate("cases => cases.map(Number).map(formatCount)", list(counts)) == list(counts.values())
    rejected = page.evaluate(
        """cases => cases.map(c => { try { formatDkk(c); return null; } catch (e) { return e.name; } })""",
        ["", ".", "abc", "1.2.3", "1,5", "NaN"],
    )
    assert rejected == ["TypeError"] * 6


def raw_get(server: PageServer, path: str) -> http.client.HTTPResponse:
    """A GET whose path is sent exactly as written (browsers and httpx would normalise `..`)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/style.css", "text/css; charset=utf-8"),
    ],
)
def test_static_files_carry_content_type_and_security_headers(server: PageServer, path: str, content_type: str) -> None:
    response = raw_get(server, path)

    assert response.status == 200
    assert response.getheader("content-type") == content_type
    assert response.getheader("content-security-policy") == CSP
    assert {name: response.getheader(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/../something",
        "/dashboard/../pyproject.toml",
        "/dashboard/..%2F__init__.py",
        "/dashboard/%2e%2e",
        "/dashboard/__init__.py",
        "/dashboard/index.html",
        "/dashboard/static",
        "/dashboard/app.js.map",
        "/dashboard/APP.JS",
    ],
)
def test_only_allow_listed_names_are_served(server: PageServer, path: str) -> None:
    response = raw_get(server, path)

    assert response.status == 404
    assert response.getheader("content-security-policy") == CSP
