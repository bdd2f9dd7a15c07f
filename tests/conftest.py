"""Shared fixtures: the tiny models (built once) and the real stack (started once per session with `anker up`).

The stack is the product as users run it: a Ray head, Ray Serve, the ingress, the tokenizer and real vLLM engines
on loopback ports picked for this session, torn down with `anker down`. If it cannot start, the tests fail loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.tiny_models import build_model
from config.settings import DEFAULT_PROFILE
from testkit.otlp import OtlpReceiver
from testkit.ports import free_port
from testkit.postgres import PostgresServer, postgres_server, throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent
ANKER = str(Path(sys.executable).parent / "anker")
MODELS = {"qwen3-next-tiny": "qwen3-next", "qwen3-moe-tiny": "qwen3-moe"}
STACK_START_TIMEOUT_S = 900
FRESH_ANSWER_S = 1.0  # a replica's answer about its vLLM queue that is recent enough to kill on
STARTUP_PROBE_TIMEOUT_S = 120  # a request that waits for the ingress replica to start is answered well before this
# The second model autoscales 1..2 in the test stack, with delays short enough for a test to see both changes
# (tests/test_stack_autoscaling.py); a queue of 4 per replica is far above what the other tests send.
AUTOSCALED_MODEL = "qwen3-moe-tiny"
AUTOSCALING_ENV = {
    "ANKER__MODELS__1__MAX_REPLICAS": "2",
    "ANKER__MODELS__1__AUTOSCALING__TARGET_QUEUE_PER_REPLICA": "4",
    "ANKER__MODELS__1__AUTOSCALING__UPSCALE_DELAY_S": "3",
    "ANKER__MODELS__1__AUTOSCALING__DOWNSCALE_DELAY_S": "15",
    "ANKER__MODELS__1__AUTOSCALING__LOOK_BACK_PERIOD_S": "4",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of the second app run after the other stack tests (its two engines start only then and load no one
    else's test), and tests that restart the session's stack run last, so that nothing else sees the restart."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("restarts_stack") is not None:
            return 2
        return 1 if "second_app" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=rank)


@dataclass(frozen=True)
class StartupProbe:
    """What a client saw while `anker up` was starting: when it asked (seconds since the start), the HTTP status or
    error name, Retry-After, the error code, and how long the answer took."""

    seconds: float
    status: int | str
    retry_after: str | None = None
    code: str | None = None
    text: str = ""  # the start of a body that is not JSON
    waited: float = 0.0


def create_key(env: dict[str, str], tenant: str, *flags: str) -> str:
    """A new API key of organisation ``tenant`` (`anker keys create`, with ``flags``) in ``env``'s key store."""
    created = subprocess.run(
        [ANKER, "keys", "create", "--tenant", tenant, *flags], env=env, capture_output=True, text=True, timeout=120
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Stack:
    base_url: str
    api_key: str
    env: dict[str, str]
    data_dir: Path
    gcs_address: str
    startup: tuple[StartupProbe, ...] = ()

    def anker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ANKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def new_key(self, tenant: str, *flags: str) -> str:
        """A new key of organisation ``tenant``; a tenant of its own gives a test a ledger no other test reaches."""
        return create_key(self.env, tenant, *flags)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (testkit/postgres.py)."""
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_model(root / name, arch).path for name, arch in MODELS.items()}


def _start_while_probing(
    env: dict[str, str], base_url: str, key: str
) -> tuple[subprocess.CompletedProcess[str], list[StartupProbe]]:
    import httpx

    process = subprocess.Popen(
        [ANKER, "up", "--detach"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    probes: list[StartupProbe] = []
    started = time.monotonic()
    body = {"model": "qwen3-next-tiny", "messages": [{"role": "user", "content": "hej"}], "max_tokens": 1}
    while process.poll() is None and time.monotonic() - started < STACK_START_TIMEOUT_S:
        asked = time.monotonic()
        elapsed = round(asked - started, 1)
        try:
            # A request that arrives while the ingress replica starts waits in Serve's queue until it runs (seconds
            # on a busy box); the timeout is long enough to tell that wait from a hang.
            r = httpx.post(
                f"{base_url}/v1/chat/completions",
                json=body,
                timeout=STARTUP_PROBE_TIMEOUT_S,
                headers={"Authorization": f"Bearer {key}"},
            )
            try:
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                text = ""
            except ValueError:
                code, text = None, r.text[:120]
            waited = round(time.monotonic() - asked, 1)
            probes.append(StartupProbe(elapsed, r.status_code, r.headers.get("retry-after"), code, text, waited))
        except httpx.HTTPError as exc:
            probes.append(StartupProbe(elapsed, type(exc).__name__, waited=round(time.monotonic() - asked, 1)))
        time.sleep(0.5)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), probes


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """The stack's OpenTelemetry collector: every deployment exports its spans here over OTLP/HTTP."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], otlp: OtlpReceiver
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("anker-data")
    for name, path in tiny_models.items():
        shutil.copytree(path, data_dir / "models" / name)
    ports = {
        "ANKER_PORT": free_port(),
        "ANKER__RAY__GCS_PORT": free_port(),
        "ANKER__RAY__DASHBOARD_PORT": free_port(),
        "ANKER__RAY__CLIENT_SERVER_PORT": free_port(),
        "ANKER__RAY__DASHBOARD_AGENT_LISTEN_PORT": free_port(),
        "ANKER__RAY__METRICS_EXPORT_PORT": free_port(),
    }
    env = {
        **os.environ,
        "ANKER_CONFIG": str(DEFAULT_PROFILE),
        "ANKER_DATA_DIR": str(data_dir),
        **{k: str(v) for k, v in ports.items()},
        **AUTOSCALING_ENV,
        **otlp.env(),
    }
    # A key made before the stack starts (the key store is a file): with it, a client calls the API all through
    # start-up, as users' retry loops do, and the tests check what it was told.
    early_key = create_key(env, "startup-probe")
    up, startup = _start_while_probing(env, f"http://127.0.0.1:{ports['ANKER_PORT']}", early_key)
    stack = Stack(
        base_url=f"http://127.0.0.1:{ports['ANKER_PORT']}",
        api_key="",
        env=env,
        data_dir=data_dir,
        gcs_address=f"127.0.0.1:{ports['ANKER__RAY__GCS_PORT']}",
    )
    try:
        if up.returncode != 0:
            pytest.fail(
                f"`anker up --detach` failed ({up.returncode}); the real stack is required.\n"
                f"stdout:\n{up.stdout[-4000:]}\nstderr:\n{up.stderr[-4000:]}\n"
                f"ray head log:\n{_tail(data_dir / 'run' / 'ray-head.log')}"
            )
        yield Stack(stack.base_url, stack.new_key("tests"), env, data_dir, stack.gcs_address, tuple(startup))
    finally:
        _disconnect()
        down = stack.anker("down", timeout=180)
        if down.returncode != 0:
            print(f"anker down failed: {down.stdout}\n{down.stderr}", file=sys.stderr)


def _disconnect() -> None:
    """This process stops being a driver of the stack's cluster, before `anker down` takes that cluster away: a
    driver whose cluster is gone can crash the interpreter as it exits, after every test has passed."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


SECOND_APP, SECOND_PREFIX, SECOND_MODEL = "second", "/second", "qwen3-next-tiny"
SECOND_READY_TIMEOUT_S = 600
# Small engine queues, so that a test can fill them: 2 replicas x 4 running + 4 waiting in the ingress.
SECOND_ENV = {
    "ANKER__MODELS__0__MIN_REPLICAS": "2",
    "ANKER__MODELS__0__MAX_REPLICAS": "2",
    "ANKER__STACK__ENGINE_MAX_ONGOING_REQUESTS": "4",
    "ANKER__STACK__ENGINE_MAX_QUEUED_REQUESTS": "4",
}


@dataclass(frozen=True)
class EngineKill:
    """An engine replica killed mid-generation, and what the replicas said just before: vLLM's own queue (its
    ``Engine.record_routing_stats``) and Serve's count of ongoing requests, asked of each replica's actor."""

    victim: str  # actor name
    vllm: dict[str, float]  # the victim's vLLM queue as it answered: running, waiting, in_flight, kv_cache_usage
    answered_in_s: float  # how long the victim took to answer
    killed_after_s: float  # from its answer to the kill
    killed_s: float  # time.monotonic() of the kill
    ongoing: dict[str, int | str]  # Serve's ongoing requests per replica, asked with the same round (or why none)

    def __str__(self) -> str:
        return (
            f"killed {_short(self.victim)} {self.killed_after_s:.3f} s after its vLLM said {self.vllm} "
            f"(it answered in {self.answered_in_s:.3f} s); Serve's ongoing requests then: {self.ongoing}"
        )


def _short(replica: str) -> str:
    return replica.rsplit("#", 1)[-1]


def _answers(refs: dict[str, Any], timeout_s: float = 10) -> dict[str, int | str]:
    """Each actor call's answer by name, or the name of the error it ended with (never a guessed value)."""
    import ray

    answers: dict[str, int | str] = {}
    for name, ref in refs.items():
        try:
            answers[_short(name)] = int(ray.get(ref, timeout=timeout_s))
        except Exception as exc:
            answers[_short(name)] = type(exc).__name__
    return answers


@dataclass(frozen=True)
class SecondApp:
    """A second Anker application on the stack's Ray cluster (see the ``second_app`` fixture)."""

    base_url: str
    api_key: str  # the tests' key: its ledger holds only what the tests sent
    env: dict[str, str]  # the `anker` CLI's environment for this app: its data folder and database
    stack_env: dict[str, str]
    data_dir: Path
    postgres: PostgresServer
    probe_key: str = ""  # the readiness probe's own key (a probe that timed out is still billed, later)

    def anker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ANKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def new_key(self, tenant: str) -> str:
        """A key of a new organisation: a test's own ledger, which no other test's late usage reaches."""
        return create_key(self.env, tenant)

    def connect(self) -> None:
        """This process as a driver on the stack's cluster (again, if a test module disconnected it)."""
        from cluster.local import connect
        from config.settings import load_config

        connect(load_config(environ=self.stack_env))

    def alive_replicas(self, deployment: str) -> dict[str, int]:
        """The deployment's live replicas: actor name -> process id."""
        from ray.util.state import list_actors

        prefix = f"SERVE_REPLICA::{SECOND_APP}#{deployment}#"
        return {
            str(a["name"]): int(a["pid"])
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if str(a.get("name") or "").startswith(prefix)
        }

    def running_replicas(self, deployment: str) -> int:
        from ray import serve

        status = serve.status().applications[SECOND_APP].deployments[deployment]
        return int(status.replica_states.get("RUNNING", 0))

    def kill_replica(self, deployment: str, replicas: int, timeout_s: float = SECOND_READY_TIMEOUT_S) -> None:
        """Kills the first live replica of ``deployment`` and waits until Serve has replaced it (``replicas``
        running)."""
        import ray

        self.connect()
        victim = next(iter(self.alive_replicas(deployment)))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        self.wait_for_replacement(deployment, replicas, victim, timeout_s)

    def kill_engine_mid_generation(
        self, deployment: str, replicas: int, timeout_s: float = 120, looking: threading.Event | None = None
    ) -> EngineKill:
        """Kills an engine replica's process (SIGKILL, as a crash or the OOM killer does: at once; the test cluster
        is this machine) the moment its vLLM says it is generating, asked of every replica's actor at once, the
        first to say so being the victim: so the kill lands in the middle of generations. Then waits until Serve
        has replaced it. Fails with what the replicas said if none generated within ``timeout_s``.

        Generating is vLLM's ``running`` (in its batch, so past the first token), not ``in_flight``: a request
        still waiting for its first step has no response yet, and a kill then is answered with 503, not a cut. Only
        an answer that came within ``FRESH_ANSWER_S`` of the question is acted on. ``looking`` is set once the
        replicas' actors are found, which takes seconds (Ray's state API) that short streams may not last."""
        import ray

        self.connect()
        deadline = time.monotonic() + timeout_s
        said: list[str] = []
        pids: dict[str, int] = {}
        actors: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not actors:  # found once (seconds, through Ray's state API), again only after a replica failed to answer
                pids = self.alive_replicas(deployment)
                for name in pids:
                    with contextlib.suppress(ValueError):  # gone since it was listed
                        actors[name] = ray.get_actor(name, namespace="serve")
                if looking is not None:
                    looking.set()
            asked = time.monotonic()
            asking = {actor.record_routing_stats.remote(): name for name, actor in actors.items()}
            ongoing = {name: actor.get_num_ongoing_requests.remote() for name, actor in actors.items()}
            pending = list(asking)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
                if not ready:
                    break
                name = asking[ready[0]]
                try:
                    vllm = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    said.append(f"{_short(name)}: {type(exc).__name__}")
                    actors = {}
                    continue
                answered = time.monotonic()
                if answered - asked > FRESH_ANSWER_S:
                    # On a starved machine an answer can take seconds (once 8 s, CI): its streams may be ending by
                    # now, so a kill on it may cut nothing. Ask again.
                    said.append(f"{_short(name)}: {vllm} after {answered - asked:.1f} s, too late to act on")
                    continue
                if vllm["running"] > 0:
                    os.kill(pids[name], signal.SIGKILL)
                    killed = time.monotonic()
                    kill = EngineKill(name, vllm, answered - asked, killed - answered, killed, _answers(ongoing))
                    self.wait_for_replacement(deployment, replicas, name)
                    return kill
                said.append(f"{_short(name)}: {vllm}")
            time.sleep(0.05)
        raise AssertionError(f"no replica of {deployment} generated within {timeout_s:g} s: {said[-6:]}")

    def wait_for_replacement(
        self, deployment: str, replicas: int, gone: str, timeout_s: float = SECOND_READY_TIMEOUT_S
    ) -> None:
        """Waits until the replica ``gone`` (an actor name) is dead and ``replicas`` others are running."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = self.alive_replicas(deployment)
            if gone not in alive and len(alive) == replicas and self.running_replicas(deployment) == replicas:
                return
            time.sleep(1)
        raise AssertionError(f"{deployment} did not recover within {timeout_s} s")

    def wait_until_serving(self, timeout_s: float = SECOND_READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                r = httpx.post(
                    f"{self.base_url}/v1/chat/completions",
                    json={"model": SECOND_MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 1},
                    headers={"Authorization": f"Bearer {self.probe_key or self.api_key}"},
                    timeout=30,
                )
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(2)
        raise AssertionError(f"the second app did not serve within {timeout_s} s: {last}")


@pytest.fixture(scope="session")
def second_app(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondApp]:
    """The application `anker up` deploys, built from the same config but with one model at two engine replicas,
    small engine queues, its own data folder and its ledger on a PostgreSQL server of its own (which fault tests stop
    and start), deployed beside the stack's under ``/second``: for routing, back-pressure and fault tests."""
    from ray import serve

    from config.settings import load_config
    from deployments.builder import build_app

    data_dir = tmp_path_factory.mktemp("second-data")
    shutil.copytree(stack.data_dir / "models" / SECOND_MODEL, data_dir / "models" / SECOND_MODEL)
    with postgres_server() as postgres:
        env = {**stack.env, **SECOND_ENV, "ANKER_DATA_DIR": str(data_dir), "ANKER_DATABASE_URL": postgres.url}
        keys = [create_key(env, tenant) for tenant in ("second", "second-probe")]
        config = load_config(environ=env)
        config = config.model_copy(update={"models": [m for m in config.models if m.name == SECOND_MODEL]})
        app = SecondApp(f"{stack.base_url}{SECOND_PREFIX}", keys[0], env, dict(stack.env), data_dir, postgres, keys[1])
        app.connect()
        serve.run(build_app(config), name=SECOND_APP, route_prefix=SECOND_PREFIX)
        try:
            app.wait_until_serving()
            yield app
        finally:
            import ray

            ray.shutdown()  # the restart test may have replaced the cluster this driver knew
            app.connect()
            try:
                serve.delete(SECOND_APP)
            except Exception as exc:  # the cluster it ran on was restarted: the app went with it
                print(f"second app not deleted ({type(exc).__name__}); the stack was restarted", file=sys.stderr)
            finally:
                _disconnect()
