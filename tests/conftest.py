"""Shared fixtures: the tiny models (built once) and the real stack (started once per session with `anker up`).

The stack is the product as users run it: a Ray head, Ray Serve with its HAProxy direct ingress, the control
application and each model's own application of real vLLM engine replicas, on loopback ports picked for this session,
torn down with `anker down`. If it cannot start, the tests fail loudly. A second stack (``second_app``) runs beside it
on a Ray cluster of its own, for the tests that break things.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cluster.local import haproxy_dir
from cluster.tiny_models import build_model
from config.naming import APP_NAME, BILLING_DEPLOYMENT, ENGINE_DEPLOYMENT_PREFIX, deployment_suffix, model_app_name
from config.schema import AnkerConfig
from config.settings import DEFAULT_PROFILE, load_config
from testkit.otlp import OtlpReceiver
from testkit.ports import stack_ports
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
# Time enough for a drain to let the longest test stream finish (tests/test_stack_restart.py's 1,900 tokens): on a
# busy machine three of them at once have taken over two minutes (CI, 92ed0a4), past the default of 60 s.
DRAIN_ENV = {"ANKER__STACK__DRAIN_TIMEOUT_S": "240"}
# A usage line per call: the zero-data-retention test finds each request's id in a log file, so that it knows its
# search of the files covers what those requests left there.
LOG_REQUESTS_ENV = {"ANKER__SERVER__LOG_REQUESTS": "true"}


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


def engine_of(model: str) -> tuple[str, str]:
    """The Serve application and deployment of ``model``'s engine replicas."""
    return model_app_name(model), ENGINE_DEPLOYMENT_PREFIX + deployment_suffix(model)


BILLING = (APP_NAME, BILLING_DEPLOYMENT)  # the billing actor, in the control application


@dataclass(frozen=True)
class EngineKill:
    """An engine replica killed mid-generation, and what the replicas said just before: vLLM's own queue (its
    ``record_routing_stats``) and Serve's count of ongoing requests, asked of each replica's actor."""

    victim: str  # actor name
    vllm: dict[str, float]  # the victim's vLLM queue as it answered: running, waiting, in_flight
    answered_in_s: float  # how long the victim took to answer
    killed_after_s: float  # from its answer to the kill
    killed_s: float  # time.monotonic() just after the kill
    killing_s: float  # ... and just before it: a connection the kill ended may have ended in between
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


READY_TIMEOUT_S = 600


@dataclass(frozen=True)
class Stack:
    """A stack `anker up` started, as its clients and its operator reach it: the API, the CLI, and its Ray cluster
    (for what only Ray can do: ask a replica's actor, kill one)."""

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

    @property
    def config(self) -> AnkerConfig:
        return load_config(environ=self.env)

    def connect(self) -> None:
        """This process as a driver on this stack's Ray cluster (leaving another stack's cluster first: a process
        is a driver of one cluster at a time)."""
        import ray

        from cluster.local import connect

        # Ray names the cluster by the node's address, not loopback's: the port tells the stacks apart.
        port = self.gcs_address.rsplit(":", 1)[1]
        if ray.is_initialized() and ray.get_runtime_context().gcs_address.rsplit(":", 1)[1] != port:
            ray.shutdown()
        connect(self.config)

    def alive_replicas(self, where: tuple[str, str]) -> dict[str, int]:
        """The live replicas of deployment ``where`` (application, deployment): actor name -> process id."""
        from ray.util.state import list_actors

        app, deployment = where
        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        return {
            str(a["name"]): int(a["pid"])
            # This stack's cluster (without an address, Ray's state API asks the one it finds first on the machine).
            for a in list_actors(address=self.gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000)
            if str(a.get("name") or "").startswith(prefix)
        }

    def replica_states(self, where: tuple[str, str]) -> dict[str, int]:
        """The deployment's replicas by state, as Serve reports them (RUNNING, STARTING, STOPPING)."""
        from ray import serve

        app, deployment = where
        status = serve.status().applications[app].deployments[deployment]
        return {str(state): int(n) for state, n in status.replica_states.items() if n}

    def kill_replica(self, where: tuple[str, str], replicas: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Kills the first live replica of ``where`` and waits until Serve has replaced it (``replicas`` running)."""
        import ray

        self.connect()
        victim = next(iter(self.alive_replicas(where)))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        self.wait_for_replacement(where, replicas, victim, timeout_s)

    def kill_engine_mid_generation(
        self,
        model: str,
        replicas: int,
        timeout_s: float = 120,
        looking: threading.Event | None = None,
        core: bool = False,
    ) -> EngineKill:
        """Kills an engine replica's process of ``model`` (SIGKILL, as a crash or the OOM killer does: at once; the
        test cluster is this machine) the moment its vLLM says it is generating, asked of every replica's actor at
        once, the first to say so being the victim: so the kill lands in the middle of generations. Then waits until
        Serve has replaced it. Fails with what the replicas said if none generated within ``timeout_s``.

        Generating is vLLM's ``running`` (in its batch, so past the first token), not ``in_flight``: a request
        still waiting for its first step has no response yet, and a kill then is answered with 503, not a cut. Only
        an answer that came within ``FRESH_ANSWER_S`` of the question is acted on. ``looking`` is set once the
        replicas' actors are found, which takes seconds (Ray's state API) that short streams may not last.
        ``core``: the victim's vLLM engine core process is killed instead (its ``VLLM::EngineCore`` child): the
        replica lives on, finds its engine dead and is replaced for it."""
        import ray

        self.connect()
        where = engine_of(model)
        deadline = time.monotonic() + timeout_s
        said: list[str] = []
        pids: dict[str, int] = {}
        actors: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not actors:  # found once (seconds, through Ray's state API), again only after a replica failed to answer
                pids = self.alive_replicas(where)
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
                    victim = engine_core_of(pids[name]) if core else pids[name]
                    killing = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    killed = time.monotonic()
                    kill = EngineKill(
                        name, vllm, answered - asked, killed - answered, killed, killing, _answers(ongoing)
                    )
                    self.wait_for_replacement(where, replicas, name)
                    return kill
                said.append(f"{_short(name)}: {vllm}")
            time.sleep(0.05)
        raise AssertionError(f"no replica of {model} generated within {timeout_s:g} s: {said[-6:]}")

    def wait_for_replacement(
        self, where: tuple[str, str], replicas: int, gone: str, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Waits until the replica ``gone`` (an actor name) is dead and ``replicas`` others are running."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = self.alive_replicas(where)
            if gone not in alive and len(alive) == replicas and self.replica_states(where).get("RUNNING") == replicas:
                return
            time.sleep(1)
        raise AssertionError(f"{where} did not recover within {timeout_s} s")


def engine_core_of(replica_pid: int) -> int:
    """The pid of the vLLM engine core process an engine replica runs (vLLM titles it ``VLLM::EngineCore``)."""
    cores = [
        child.pid
        for child in psutil.Process(replica_pid).children(recursive=True)
        if "EngineCore" in " ".join(child.cmdline())
    ]
    assert len(cores) == 1, f"engine core processes of {replica_pid}: {cores}"
    return cores[0]


def haproxies(config: AnkerConfig) -> list[psutil.Process]:
    """The HAProxy processes that run this stack's config (Ray puts it in a folder per node, and Anker patches it in
    place): as Ray's HAProxy manager knows its own, by the config path in their command line."""
    folder = f"{haproxy_dir(config)}/"
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if process.info["name"] == "haproxy"
        and any(arg.startswith(folder) and arg.endswith("/haproxy.cfg") for arg in process.info["cmdline"] or [])
    ]


def outlive_the_cluster(config: AnkerConfig) -> list[int]:
    """The HAProxy processes still running 10 s after the stack's cluster stopped, killed so that they free their
    ports."""
    deadline = time.monotonic() + 10
    while (left := haproxies(config)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [process.pid for process in left]


def stop_stack(stack: Stack, check: bool = True) -> None:
    """`anker down`, after this process stopped being a driver of the stack's cluster; with ``check``, fails if it
    failed, if HAProxy outlived the cluster, or if HAProxy's folder was left behind."""
    _disconnect()
    config = stack.config
    down = stack.anker("down", timeout=360)  # a drain of up to DRAIN_ENV's 240 s, then the stop
    left = outlive_the_cluster(config)
    if not check:
        return
    assert down.returncode == 0, f"anker down failed: {down.stdout[-3000:]}\n{down.stderr[-3000:]}"
    assert not left, f"HAProxy outlived its Ray cluster (killed now): {left}"
    assert not haproxy_dir(config).exists(), "`anker down` left HAProxy's folder behind"


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
    ports = stack_ports()
    env = {
        **os.environ,
        "ANKER_CONFIG": str(DEFAULT_PROFILE),
        "ANKER_DATA_DIR": str(data_dir),
        **ports,
        **AUTOSCALING_ENV,
        **DRAIN_ENV,
        **LOG_REQUESTS_ENV,
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
    if up.returncode != 0:
        stop_stack(stack, check=False)
        pytest.fail(
            f"`anker up --detach` failed ({up.returncode}); the real stack is required.\n"
            f"stdout:\n{up.stdout[-4000:]}\nstderr:\n{up.stderr[-4000:]}\n"
            f"ray head log:\n{_tail(data_dir / 'run' / 'ray-head.log')}"
        )
    yield Stack(stack.base_url, stack.new_key("tests"), env, data_dir, stack.gcs_address, tuple(startup))
    stop_stack(stack)


def _disconnect() -> None:
    """This process stops being a driver of the stack's cluster, before `anker down` takes that cluster away: a
    driver whose cluster is gone can crash the interpreter as it exits, after every test has passed."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


SECOND_MODEL = "qwen3-next-tiny"
# One model at two engine replicas of small queues, so that a test can fill them: 2 x (4 running + 4 waiting).
SECOND_ENV = {
    "ANKER__MODELS__0__MIN_REPLICAS": "2",
    "ANKER__MODELS__0__MAX_REPLICAS": "2",
    "ANKER__STACK__ENGINE_MAX_ONGOING_REQUESTS": "4",
    "ANKER__STACK__ENGINE_MAX_QUEUED_REQUESTS": "4",
    "ANKER__RAY__NUM_CPUS": "6",
    "ANKER__RAY__MIN_WORKER_PORT": "20000",
    "ANKER__RAY__MAX_WORKER_PORT": "20999",
}


def one_model_profile(root: Path, model: str) -> Path:
    """The local profile with only ``model``."""
    profile = yaml.safe_load(DEFAULT_PROFILE.read_text())
    profile["models"] = [m for m in profile["models"] if m["name"] == model]
    path = root / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@dataclass(frozen=True)
class SecondApp(Stack):
    """A second stack beside the session's, on a Ray cluster of its own (see the ``second_app`` fixture)."""

    postgres: PostgresServer | None = None
    probe_key: str = ""  # the readiness probe's own key (a probe that timed out is still billed, later)

    @property
    def ledger(self) -> PostgresServer:
        assert self.postgres is not None
        return self.postgres

    def wait_until_serving(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until both engine replicas run and the model answers."""
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
                    self.connect()
                    states = self.replica_states(engine_of(SECOND_MODEL))
                    if states.get("RUNNING") == 2:
                        return
                    last = f"replicas {states}"
                else:
                    last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(2)
        raise AssertionError(f"the second stack did not serve within {timeout_s} s: {last}")


_SECOND_RUNNING: list[SecondApp] = []  # the second stack while it runs


@pytest.fixture
def alone() -> None:
    """The session's stack alone on the machine: stops the second stack if it runs (its tests run before)."""
    while _SECOND_RUNNING:
        stop_stack(_SECOND_RUNNING.pop())


@pytest.fixture(scope="session")
def second_app(stack: Stack, tiny_models: dict[str, Path], otlp: OtlpReceiver) -> Iterator[SecondApp]:
    """A second stack, as `anker up` starts it, on a Ray cluster of its own: one model at two engine replicas with
    small engine queues, its own data folder and its ledger on a PostgreSQL server of its own (which fault tests
    stop and start): for routing, back-pressure and fault tests, which break what the session's stack must keep."""
    # A short folder: Ray's Unix sockets live in it (their paths have at most 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="aks-", dir="/tmp"))
    data_dir = root / "data"
    shutil.copytree(tiny_models[SECOND_MODEL], data_dir / "models" / SECOND_MODEL)
    # The session stack's Ray token: this process is a driver of either cluster in turn, and Ray reads a process's
    # token once.
    (data_dir / "secrets").mkdir(parents=True)
    shutil.copy2(stack.data_dir / "secrets" / "ray_auth_token", data_dir / "secrets" / "ray_auth_token")
    try:
        with postgres_server() as postgres:
            ports = stack_ports()
            env = {
                **os.environ,
                "ANKER_CONFIG": str(one_model_profile(root, SECOND_MODEL)),
                "ANKER_DATA_DIR": str(data_dir),
                "ANKER_DATABASE_URL": postgres.url,
                "ANKER__RAY__TEMP_DIR": str(root / "ray"),
                **ports,
                **SECOND_ENV,
                **LOG_REQUESTS_ENV,
                **otlp.env(),
            }
            keys = [create_key(env, tenant) for tenant in ("second", "second-probe")]
            app = SecondApp(
                f"http://127.0.0.1:{ports['ANKER_PORT']}",
                keys[0],
                env,
                data_dir,
                f"127.0.0.1:{ports['ANKER__RAY__GCS_PORT']}",
                postgres=postgres,
                probe_key=keys[1],
            )
            up = app.anker("up", "--detach", timeout=STACK_START_TIMEOUT_S)
            if up.returncode != 0:
                stop_stack(app, check=False)
                pytest.fail(f"the second stack did not start:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
            try:
                app.wait_until_serving()
            except BaseException:
                stop_stack(app, check=False)
                raise
            _SECOND_RUNNING.append(app)
            yield app
            if app in _SECOND_RUNNING:
                _SECOND_RUNNING.remove(app)
                stop_stack(app)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def vllm_cpu_env() -> Iterator[None]:
    """vLLM's CPU settings for an engine a test module starts in the test's own process: a small KV cache, its
    worker spawned (not forked from a process that has threads) and tokenizers without their own threads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        patch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> str | None:
    """A ledger's database URL: None for the embedded SQLite file, or a fresh throwaway PostgreSQL database."""
    if request.param == "sqlite":
        return None
    from tests.inprocess import clean_postgres

    return clean_postgres(request.getfixturevalue("postgres_url"))
