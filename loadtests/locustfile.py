"""Locust users that stream chat completions from an OpenAI-compatible API (Anker, or any other) and time them.

Records per workload (the row's Name): the request itself (Type ``POST``: time to the end of the stream, size in
output tokens), and ``TTFT`` (ms), ``ITL`` (ms, one sample per gap between output chunks) and ``TOK/S`` (output tokens
per second of the whole request, in the response-time columns). Failures carry the HTTP status and OpenAI error code
only: prompts and completions are never logged.
"""

from __future__ import annotations

import random
import time
from typing import Any

import requests
from locust import User, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtests.workloads import ChatRequest, Conversation, StreamResult, StreamTimer, shared_prefix, short_chat

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120


@events.init_command_line_parser.add_listener
def _arguments(parser: LocustArgumentParser) -> None:
    # The key stays out of the web UI: its page would carry the value to every browser that opens it.
    parser.add_argument("--api-key", env_var="ANKER_API_KEY", default="", include_in_web_ui=False, help="ank_...")
    parser.add_argument("--model", env_var="ANKER_MODEL", default="qwen3-next-tiny", help="the model to call")


@events.init.add_listener
def _require_key(environment: Environment, **_: Any) -> None:
    # Workers get the master's options when a test starts, so only the process that owns the options checks them.
    options = environment.parsed_options
    if options is not None and not isinstance(environment.runner, WorkerRunner) and not options.api_key:
        raise SystemExit("no API key: pass --api-key or set ANKER_API_KEY")


class ApiError(Exception):
    """A failed request, named by its HTTP status and OpenAI error code (never by its message)."""


class ChatUser(User):
    """Streams one chat completion per task and reports it; subclasses say which request to send."""

    abstract = True
    host = "http://127.0.0.1:8000"
    wait_time = between(0.5, 2.0)
    workload = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.rng = random.Random()
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    def stream(self, request: ChatRequest) -> StreamResult:
        options = self.environment.parsed_options
        assert options is not None
        started_s = time.perf_counter()
        started_epoch_s = time.time()
        timer = StreamTimer(started_s)
        try:
            with self.session.post(
                f"{self.host}/v1/chat/completions",
                json=request.body(options.model),
                headers={"Authorization": f"Bearer {options.api_key}"},
                stream=True,
                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            ) as response:
                if response.status_code != 200:
                    result = timer.failed(f"{response.status_code} {_error_code(response)}", time.perf_counter())
                else:
                    for data in response.iter_content(chunk_size=None):
                        timer.feed(data, time.perf_counter())
                    result = timer.result(time.perf_counter())
        except requests.RequestException as exc:
            result = timer.failed(type(exc).__name__, time.perf_counter())
        self._report(result, started_epoch_s)
        return result

    def _report(self, result: StreamResult, started_epoch_s: float) -> None:
        fire = self.environment.events.request.fire
        fire(
            request_type="POST",
            name=self.workload,
            response_time=result.total_s * 1000,
            response_length=result.output_tokens,
            exception=ApiError(result.error) if result.error else None,
            context={},
            start_time=started_epoch_s,
        )
        if result.error or result.ttft_s is None:
            return
        fire(request_type="TTFT", name=self.workload, response_time=result.ttft_s * 1000, response_length=0)
        for gap_s in result.itl_s:
            fire(request_type="ITL", name=self.workload, response_time=gap_s * 1000, response_length=0)
        fire(request_type="TOK/S", name=self.workload, response_time=result.output_tokens_per_s, response_length=0)


def _error_code(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("code") or error.get("type") or "error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "no_openai_error"


class ShortChatUser(ChatUser):
    """Short questions, no system prompt."""

    workload = "short_chat"

    @task
    def ask(self) -> None:
        self.stream(short_chat(self.rng))


class SharedPrefixUser(ChatUser):
    """RAG-like: one long system prompt shared by every request (prefix-cache hits), a short question each time."""

    workload = "shared_prefix"

    @task
    def ask(self) -> None:
        self.stream(shared_prefix(self.rng))


class MultiTurnUser(ChatUser):
    """Conversations of 4-6 turns, one turn per task; a failed turn starts a new conversation."""

    workload = "multi_turn"

    def on_start(self) -> None:
        self.conversation = Conversation(self.rng)

    @task
    def turn(self) -> None:
        if self.conversation.done:
            self.conversation = Conversation(self.rng)
        result = self.stream(self.conversation.next_request())
        if result.error:
            self.conversation = Conversation(self.rng)
        else:
            self.conversation.add_reply(result.text)
