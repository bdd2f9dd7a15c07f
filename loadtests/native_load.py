"""Load from a native client, and a profile of where a process's Python time goes: how many requests an engine
replica's serving path carries when the load client costs next to nothing, and which code spends its time.

The httpx load client (``loadtests/http_load.py``) checks every answer, but it spends about a millisecond of CPU per
request on the same two cores as the stack. ``wrk`` (a Debian package; C, one thread) sends the same chat completion
on N kept-alive connections for a fixed time and counts answers by status, at a few microseconds a request. What it
cannot check, the ledger does (``loadtests/control_plane.py``).

``profile_gil`` samples one process with py-spy, only while a thread holds the GIL (Python work; a thread waiting
for the GIL is not counted), and sorts the samples by the package whose code was innermost on the stack: Anker's,
vLLM's, Ray's, uvicorn's, ...
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.http_load import chat_body

WRK = "wrk"
PY_SPY = "py-spy"

# One request, as a wrk script: method, headers and body are fixed; the key and the body come from the environment,
# never from the command line (a key in a process list is a key in every `ps`).
_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("ANKER_WRK_KEY")
wrk.body = os.getenv("ANKER_WRK_BODY")
"""


class ToolMissing(RuntimeError):
    """A native tool the benchmark was asked to use is not installed."""


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None:
        raise ToolMissing(f"{name} is not installed (make system-deps installs wrk; py-spy is in the bench extras)")
    return found


@dataclass(frozen=True)
class WrkRun:
    """What wrk reported for one measured run, and the CPU it used itself."""

    stream: bool
    connections: int
    seconds: float
    requests: int  # answers received in the measured run, of any status
    not_2xx: int
    socket_errors: int
    latency_ms: dict[str, float]  # "50%", "90%", "99%": wrk's latency distribution
    cpu_s: float  # wrk's own CPU time, user and system

    @property
    def successes(self) -> int:
        return self.requests - self.not_2xx

    @property
    def requests_per_s(self) -> float:
        return self.successes / self.seconds if self.seconds > 0 else 0.0


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _parse(output: str, stream: bool, connections: int, cpu_s: float) -> WrkRun:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    if done is None:
        raise RuntimeError(f"wrk gave no result:\n{output[-2000:]}")
    seconds = float(done.group(2)) * _UNITS_MS[done.group(3)] / 1000
    not_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    latency = {
        m.group(1) + "%": float(m.group(2)) * _UNITS_MS[m.group(3)]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    }
    return WrkRun(
        stream=stream,
        connections=connections,
        seconds=seconds,
        requests=int(done.group(1)),
        not_2xx=int(not_2xx.group(1)) if not_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        latency_ms=latency,
        cpu_s=cpu_s,
    )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Wrk:
    """wrk against ``base_url``'s chat completions with one body. ``start`` begins a run; ``finish`` waits for it
    and reads its report (so that the caller can sample CPU while it runs)."""

    def __init__(self, base_url: str, model: str, output_tokens: int, stream: bool) -> None:
        self._binary = _tool(WRK)
        self._url = f"{base_url}/v1/chat/completions"
        self._stream = stream
        self._body = json.dumps(chat_body(model, output_tokens, stream))
        self._folder = tempfile.TemporaryDirectory(prefix="anker-wrk-")
        self._script = Path(self._folder.name) / "chat.lua"
        self._script.write_text(_SCRIPT, encoding="utf-8")
        self._running: tuple[subprocess.Popen[str], int, float] | None = None

    def start(self, key: str, connections: int, seconds: float) -> None:
        env = {**os.environ, "ANKER_WRK_KEY": key, "ANKER_WRK_BODY": self._body}
        command = [self._binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
        command += ["-s", str(self._script), self._url]
        cpu_before = _children_cpu_s()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._running = (process, connections, cpu_before)

    def finish(self) -> WrkRun:
        assert self._running is not None, "start a run first"
        process, connections, cpu_before = self._running
        self._running = None
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"wrk failed ({process.returncode}):\n{output[-2000:]}")
        return _parse(output, self._stream, connections, _children_cpu_s() - cpu_before)

    def close(self) -> None:
        self._folder.cleanup()


# -- where a process's Python time goes ---------------------------------------------------------------------------

# The package a frame's file belongs to, by the innermost match on the stack; library code below it (asyncio,
# pydantic, json, logging, ...) counts for the caller that asked for it.
OWNERS = (
    ("deployments/", "Anker"),
    ("observability/", "Anker"),
    ("testkit/", "engine double"),
    ("vllm/", "vLLM"),
    ("ray/", "Ray Serve"),
    ("uvicorn/", "uvicorn"),
    ("starlette/", "Starlette and FastAPI"),
    ("fastapi/", "Starlette and FastAPI"),
    ("transformers/", "transformers (tokenizer, chat template)"),
    ("jinja2/", "transformers (tokenizer, chat template)"),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+):\d+\)$")


@dataclass
class Profile:
    """GIL-holding samples of one process, by owner and by the owner's innermost function."""

    seconds: float
    rate_hz: int
    samples: int = 0
    by_owner: Counter[str] = field(default_factory=Counter)
    by_function: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def gil_share(self) -> float:
        """Of the profiled time, the share in which some thread held the GIL."""
        return self.samples / (self.seconds * self.rate_hz) if self.seconds > 0 else 0.0


def _owner(frames: list[str]) -> tuple[str, str]:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        if match is None:
            continue
        path = match.group("file")
        for prefix, owner in OWNERS:
            if path.startswith(prefix) or f"/{prefix}" in path:
                return owner, f"{match.group('function')} ({path})"
    leaf = _FRAME.match(frames[-1]) if frames else None
    return "other (event loop, gRPC, standard library)", (
        f"{leaf.group('function')} ({leaf.group('file')})" if leaf else "?"
    )


def read_profile(raw: str, seconds: float, rate_hz: int) -> Profile:
    """py-spy's raw output (``stack;frames count`` lines) sorted by owner."""
    profile = Profile(seconds, rate_hz)
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first is the thread
        owner, function = _owner(frames)
        profile.samples += int(count)
        profile.by_owner[owner] += int(count)
        profile.by_function[(owner, function)] += int(count)
    return profile


def profile_gil(pid: int, seconds: float, rate_hz: int = 200) -> Profile:
    """Samples process ``pid`` for ``seconds`` while a thread of it holds the GIL (py-spy --gil; it reads the
    process's memory and never stops it)."""
    binary = _tool(PY_SPY)
    with tempfile.TemporaryDirectory(prefix="anker-py-spy-") as folder:
        out = Path(folder) / "profile.txt"
        command = [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate_hz)]
        command += ["--gil", "--threads", "--nonblocking", "-f", "raw", "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
        return read_profile(out.read_text(encoding="utf-8"), seconds, rate_hz)
