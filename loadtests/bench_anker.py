"""Anker as a benchmark target, started as users start it: ``anker keys create``, ``anker up --detach`` with a data
folder and free ports of its own, and ``anker down`` afterwards (which stops only that stack's Ray head).

The API key stays in memory. ``anker up`` is watched: when the Ray head it started dies during start-up (a loaded
machine can time out the head's own start), the attempt is given up at once and tried once more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from cluster.local import HEAD_LOG, ray_auth_env, read_state
from config.naming import engine_deployment_name, model_app_name
from config.schema import AnkerConfig
from config.settings import load_config
from loadtests.bench_targets import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Endpoint,
    TargetError,
    clean_env,
    last_error_line,
    wait_ready,
)
from testkit.ports import stack_ports

ANKER = str(Path(sys.executable).parent / "anker")
SERVE = str(Path(sys.executable).parent / "serve")
START_ATTEMPTS = 2
# Bench keys must never be throttled: the benchmark measures the servers, not the rate limiter.
BENCH_KEY_RPM = 1_000_000_000
BENCH_KEY_TPM = 1_000_000_000  # the largest limit a key takes


class HeadDied(TargetError):
    """The stack's Ray head exited while `anker up` was starting it."""


def _process_gone(pid: int) -> bool:
    """True when ``pid`` is no more or a zombie (its parent, `anker up`, may not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _end(up: subprocess.Popen[bytes]) -> None:
    """Ends a stuck `anker up`: SIGTERM, then SIGKILL (a driver retrying a dead GCS inside Ray's C++ client does not
    get back to Python to handle SIGTERM). Its Ray head, if any, is left to `anker down`."""
    up.terminate()
    try:
        up.wait(timeout=30)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()


def _up(stack: AnkerConfig, env: dict[str, str], log: Path) -> None:
    """`anker up --detach`, until it returns, or until the Ray head it started has died."""
    with log.open("a") as out:
        up = subprocess.Popen([ANKER, "up", "--detach"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = up.wait(timeout=3)
            break
        state = read_state(stack)
        failure: TargetError | None = None
        if state is not None and _process_gone(state.head_pid):
            failure = HeadDied(f"the Ray head exited during start-up: {last_error_line(stack.run_dir / HEAD_LOG)}")
        elif time.monotonic() > deadline:
            failure = TargetError(f"`anker up --detach` did not return in {READY_TIMEOUT_S:.0f}s; log: {log}")
        if failure is not None:
            _end(up)
            raise failure
    if code != 0:
        raise TargetError(f"`anker up --detach` exited with {code}: {last_error_line(log)} (log: {log})")


def _down(env: dict[str, str], log: Path) -> None:
    try:
        with log.open("a") as out:
            down = subprocess.run(
                [ANKER, "down"], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=STOP_TIMEOUT_S * 2
            )
    except subprocess.TimeoutExpired:
        print(f"bench: `anker down` did not return in time; see {log}", file=sys.stderr)
        return
    if down.returncode != 0:
        print(f"bench: `anker down` exited with {down.returncode}; see {log}", file=sys.stderr)


def _running_replicas(stack: AnkerConfig, env: dict[str, str]) -> int:
    """Running replicas of the (only) model's engine deployment, from Serve's own CLI (token auth included)."""
    address = f"http://{stack.ray.dashboard_host}:{stack.ray.dashboard_port}"
    app = model_app_name(stack.models[0].name)
    status = subprocess.run(
        [SERVE, "status", "--address", address, "--name", app],
        env={**env, **ray_auth_env(stack)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    with contextlib.suppress(yaml.YAMLError, KeyError, TypeError, ValueError):
        app = yaml.safe_load(status.stdout)
        deployment = app["deployments"][engine_deployment_name(stack.models[0])]
        return int(deployment["replica_states"].get("RUNNING", 0))
    return 0


def wait_replicas(stack: AnkerConfig, env: dict[str, str], timeout_s: float = READY_TIMEOUT_S) -> None:
    """``/healthz`` is 200 once one engine replica is ready; a routing comparison needs all of them."""
    wanted = stack.models[0].min_replicas
    deadline = time.monotonic() + timeout_s
    running = 0
    while time.monotonic() < deadline:
        running = _running_replicas(stack, env)
        if running >= wanted:
            return
        time.sleep(3)
    raise TargetError(f"only {running} of {wanted} engine replicas running after {timeout_s:.0f}s")


def _create_key(env: dict[str, str]) -> str:
    # Made before `anker up` (the key store is a file), so that `anker up` makes no key of its own to print.
    created = subprocess.run(
        [ANKER, "keys", "create", "--tenant", "bench", "--rpm", str(BENCH_KEY_RPM), "--tpm", str(BENCH_KEY_TPM)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if created.returncode != 0:
        raise TargetError(f"`anker keys create` failed ({created.returncode}): {created.stderr.strip()[-600:]}")
    return created.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def anker(config_path: Path, work_dir: Path, label: str, overrides: dict[str, str]) -> Iterator[Endpoint]:
    """The stack serving the profile's (only) model; ``overrides`` are ``ANKER__...`` settings (replicas, router
    policy). The endpoint is handed out once every engine replica runs."""
    data_dir = work_dir / f"anker-{label}"
    log = work_dir / f"anker-{label}.log"
    ports = stack_ports()
    port = int(ports["ANKER_PORT"])
    env = clean_env(ANKER_CONFIG=str(config_path), ANKER_DATA_DIR=str(data_dir), **ports, **overrides)
    stack = load_config(config_path, env)
    key = _create_key(env)
    endpoint = Endpoint("anker", f"http://127.0.0.1:{port}", stack.models[0].name, {"Authorization": f"Bearer {key}"})
    notes: list[str] = []
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                _up(stack, env, log)
                break
            except HeadDied as exc:
                if attempt == START_ATTEMPTS:
                    raise
                notes.append(f"start-up {attempt} given up ({exc}); started again")
                print(f"bench: {notes[-1]}", file=sys.stderr)
                _down(env, log)
        wait_ready(endpoint, None, log)
        wait_replicas(stack, env)
        state = read_state(stack)
        roots = (state.head_pid,) if state is not None else ()
        yield dataclasses.replace(endpoint, notes=tuple(notes), roots=roots)
    finally:
        _down(env, log)
