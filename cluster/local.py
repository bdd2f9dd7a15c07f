"""The local stack's lifecycle: a Ray head of our own, Ray Serve on it, the Anker app deployed, and all of it stopped.

It starts and stops only what it started (the head's process group, recorded in ``<data_dir>/run/state.json``) and
never runs ``ray stop``, which would kill every Ray cluster on the machine, a test suite's included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.tiny_models import build_model, is_built
from config.schema import AnkerConfig
from deployments.cpu_pinning import pin_tree

Say = Callable[[str], None]
HEAD_LOG = "ray-head.log"
STATE_FILE = "state.json"


class StackError(Exception):
    """The stack could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class StackState:
    head_pid: int
    gcs_address: str
    http_host: str
    http_port: int
    dashboard_url: str
    data_dir: str
    started_at: float
    ray_session_dir: str = ""

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::") else self.http_host
        return f"http://{host}:{self.http_port}"


def state_path(config: AnkerConfig) -> Path:
    return config.run_dir / STATE_FILE


def read_state(config: AnkerConfig) -> StackState | None:
    try:
        return StackState(**json.loads(state_path(config).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_models(config: AnkerConfig, say: Say) -> None:
    """Builds every ``build:`` model whose folder holds no model yet."""
    for model in config.models:
        path = config.model_path(model)
        if model.build is None or is_built(path):
            continue
        say(f"building tiny {model.build} model for {model.name} in {path} ...")
        started = time.monotonic()
        built = build_model(path, model.build)
        say(
            f"  built {model.name}: {built.num_parameters:,} parameters, vocab {built.vocab_size}, "
            f"{time.monotonic() - started:.1f}s"
        )
    missing = [m.name for m in config.models if not is_built(config.model_path(m))]
    if missing:
        raise StackError(f"no model found for {', '.join(missing)}: set `path` to a checkpoint or `build:` an arch")


def ray_auth_env(config: AnkerConfig) -> dict[str, str]:
    """Ray token authentication for our cluster: a token of our own in the data folder (mode 0600), never ~/.ray."""
    path = config.data_dir / "secrets" / "ray_auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def connect(config: AnkerConfig, address: str | None = None) -> None:
    """Connects this process to the stack's Ray cluster as a driver (token auth included). ``address`` is another
    cluster's (``auto``: the one this node belongs to, as in a KubeRay pod), with the token its environment holds."""
    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    if address is None:
        os.environ.update(ray_auth_env(config))
        address = f"127.0.0.1:{config.ray.gcs_port}"
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own progress lines say what matters
    # Ray reads RAY_AUTH_MODE into its config when first imported; re-read it, as Ray itself does when it turns
    # token auth on for a process (ray._private.authentication.authentication_token_setup).
    Config.initialize("")
    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace="serve",
            logging_level=logging.ERROR,
            log_to_driver=False,
        )


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def head_command(config: AnkerConfig) -> list[str]:
    ray = config.ray
    return [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--port={ray.gcs_port}",
        f"--num-cpus={ray.num_cpus}",
        "--num-gpus=0" if all(m.accelerator == "cpu" for m in config.models) else "",
        f"--dashboard-host={ray.dashboard_host}",
        f"--dashboard-port={ray.dashboard_port}",
        f"--ray-client-server-port={ray.client_server_port}",
        f"--dashboard-agent-listen-port={ray.dashboard_agent_listen_port}",
        f"--metrics-export-port={ray.metrics_export_port}",
        f"--min-worker-port={ray.min_worker_port}",
        f"--max-worker-port={ray.max_worker_port}",
        f"--temp-dir={ray.temp_dir}" if ray.temp_dir else "",
    ]


def ray_dashboard_env(config: AnkerConfig) -> dict[str, str]:
    """Where the Ray dashboard finds Prometheus and Grafana, so that its Metrics view embeds the Grafana panels."""
    o = config.observability
    env = {}
    if o.prometheus_host:
        env["RAY_PROMETHEUS_HOST"] = o.prometheus_host
    if o.grafana_host:
        env["RAY_GRAFANA_HOST"] = o.grafana_host
    if o.grafana_iframe_host:
        env["RAY_GRAFANA_IFRAME_HOST"] = o.grafana_iframe_host
    return env


def haproxy_dir(config: AnkerConfig) -> Path:
    """A short folder of this stack's own for HAProxy's config, state and Unix sockets: a socket's path has at most
    97 bytes, and Ray puts a 57-character folder of the node's in it (``/tmp/akh-<8 hex>/<node>/admin.sock`` has
    85). Never Ray's default, which stacks would share."""
    digest = hashlib.sha256(str(config.run_dir.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"akh-{digest}"


def haproxy_env(config: AnkerConfig) -> dict[str, str]:
    """Ray Serve's HAProxy direct ingress for the head, run through Anker's program that adds the model dispatch
    (deployments/server/haproxy.py), with the map of served models."""
    from config.naming import model_route_prefix
    from deployments.server.haproxy import MODEL_MAP_ENV, hard_stop_after_s, model_map

    folder = haproxy_dir(config)
    folder.mkdir(mode=0o700, exist_ok=True)
    map_path = config.run_dir / "haproxy-models.map"
    map_path.write_text(model_map({m.name: model_route_prefix(m.name) for m in config.models}))
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # User code on each replica's own loop (no thread hop per message), gRPC between deployments, buffered
        # request-path logs, GC frozen after start-up: Ray Serve 2.60's settings for a hot request path.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(sys.executable).parent / "anker-haproxy"),
        MODEL_MAP_ENV: str(map_path),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(config.server.haproxy_metrics_port),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(config.server.haproxy_stats_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(config.server.fallback_proxy_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(config.server.haproxy_deregistration_s),
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(hard_stop_after_s(config.server.request_timeout_s)),
        # A model's ingress request router reads the prompt (deployments/server/route.py).
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }


def _start_head(config: AnkerConfig, say: Say) -> subprocess.Popen[bytes]:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    log = (config.run_dir / HEAD_LOG).open("ab")
    command = [arg for arg in head_command(config) if arg]
    say(
        f"starting Ray head (GCS 127.0.0.1:{config.ray.gcs_port}, dashboard "
        f"http://{config.ray.dashboard_host}:{config.ray.dashboard_port}) ..."
    )
    env = {
        **os.environ,
        **ray_auth_env(config),
        **ray_dashboard_env(config),
        **haproxy_env(config),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )


def _wait_for_gcs(config: AnkerConfig, head: subprocess.Popen[bytes], timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise StackError(f"the Ray head exited with {head.returncode}; see {config.run_dir / HEAD_LOG}")
        try:
            with socket.create_connection(("127.0.0.1", config.ray.gcs_port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise StackError(f"the Ray head did not open its GCS port in {timeout_s:.0f}s; see {config.run_dir / HEAD_LOG}")


def _deploy(config: AnkerConfig, say: Say, head: subprocess.Popen[bytes] | None = None) -> None:
    # Serve builds the applications in this process, and refuses an ingress request router unless HAProxy's switch
    # is on here too; it reads the switch when first imported.
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    from ray import serve
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise RuntimeError("Ray Serve was imported before HAProxy's switch was set: the deploy cannot use HAProxy")

    from deployments.builder import build_apps

    connect(config)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    targets = [serve.RunTarget(a.app, a.name, a.route_prefix) for a in build_apps(config)]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run_many(targets)
        except BaseException as exc:  # reported by the progress loop
            failure.append(exc)

    threading.Thread(target=run, name="serve-run", daemon=True).start()
    _show_progress(config, say, failure, head)


def _deployment_states() -> dict[str, str]:
    """Every deployment's state, by its name (unique across the stack's applications)."""
    from ray import serve

    return {name: d.status.value for app in serve.status().applications.values() for name, d in app.deployments.items()}


def health(base_url: str, timeout_s: float = 3.0) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(f"{base_url}/healthz", timeout=timeout_s)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError):
        return 0, {}


def _show_progress(
    config: AnkerConfig, say: Say, failure: list[BaseException], head: subprocess.Popen[bytes] | None = None
) -> None:
    started = time.monotonic()
    base_url = f"http://127.0.0.1:{config.server.port}"
    last = ""
    last_said = 0.0
    while True:
        elapsed = time.monotonic() - started
        if head is not None and head.poll() is not None:  # a dead head never becomes ready: say so, do not wait
            raise StackError(f"the Ray head exited with {head.returncode}; see {config.run_dir / HEAD_LOG}")
        if failure:
            raise StackError(f"deploying failed: {type(failure[0]).__name__}: {failure[0]}")
        states = _deployment_states()
        failed = [name for name, state in states.items() if state in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise StackError(
                f"deployment(s) {', '.join(failed)} failed to start; replica logs are under the Ray "
                "session folder (logs/serve/)"
            )
        code, body = health(base_url)
        ready = sorted(m for m, v in body.get("models", {}).items() if v.get("ready"))
        line = "  ".join(f"{name}={state}" for name, state in sorted(states.items())) or "waiting for Serve"
        line += f"  | models ready: {', '.join(ready) or 'none yet'}"
        if line != last or elapsed - last_said >= 10:
            say(f"[{elapsed:5.0f}s] {line}")
            last, last_said = line, elapsed
        if code == 200:
            say(f"ready in {elapsed:.0f}s")
            return
        if elapsed > config.stack.startup_timeout_s:
            raise StackError(f"not ready after {config.stack.startup_timeout_s:.0f}s")
        time.sleep(2)


def _session_dir() -> str:
    try:
        import ray

        return str(ray._private.worker._global_node.get_session_dir_path())  # type: ignore[attr-defined]
    except Exception:
        return ""


def start(config: AnkerConfig, say: Say) -> StackState:
    """Starts the head, deploys the app, waits until every model is ready; stops what it started on failure."""
    existing = read_state(config)
    if existing is not None and pid_alive(existing.head_pid):
        raise StackError(
            f"a stack already runs from {config.data_dir} (Ray head pid {existing.head_pid}); `anker down` stops it"
        )
    cpus = config.ray.cpu_affinity
    if cpus is not None and not set(cpus) <= os.sched_getaffinity(0):
        raise StackError(
            f"ray.cpu_affinity {cpus} names CPUs this machine does not give Anker ({sorted(os.sched_getaffinity(0))})"
        )
    ensure_models(config, say)
    head = _start_head(config, say)
    state = StackState(
        head_pid=head.pid,
        gcs_address=f"127.0.0.1:{config.ray.gcs_port}",
        http_host=config.server.host,
        http_port=config.server.port,
        dashboard_url=f"http://{config.ray.dashboard_host}:{config.ray.dashboard_port}",
        data_dir=str(config.data_dir),
        started_at=time.time(),
    )
    _write_state(config, state)
    try:
        _wait_for_gcs(config, head, timeout_s=120)
        say(f"deploying Anker on http://{config.server.host}:{config.server.port} ...")
        _deploy(config, say, head)
        if cpus is not None:
            # Pinned once it serves: the start itself runs on every CPU (on 2 cores, a pinned start takes 40 % longer).
            # What the head starts from now on inherits the pin; vLLM's CPU workers keep the cores they bound to.
            pin_tree(head.pid, cpus)
    except BaseException:
        stop(config, say)
        raise
    state = StackState(**{**asdict(state), "ray_session_dir": _session_dir()})
    _write_state(config, state)
    return state


def _write_state(config: AnkerConfig, state: StackState) -> None:
    path = state_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    tmp.replace(path)


def stop(config: AnkerConfig, say: Say, timeout_s: float = 60.0) -> bool:
    """Stops Serve (best effort) and the head's process group. True if something was running."""
    state = read_state(config)
    if state is None:
        return False
    if pid_alive(state.head_pid):
        _shutdown_serve(config, say)
        say(f"stopping Ray head (pid {state.head_pid}) ...")
        _terminate_group(state.head_pid, timeout_s)
    shutil.rmtree(haproxy_dir(config), ignore_errors=True)
    state_path(config).unlink(missing_ok=True)
    return True


def drain(config: AnkerConfig, say: Say, address: str | None = None, follow_s: float | None = None) -> bool:
    """Drains the cluster's ingress replicas and keeps them draining until ``undrain`` or the cluster's end; for a
    pod's stop hook and for maintenance. With ``follow_s``, drains only if another drain begins within that many
    seconds (a worker pod following its head's drain). Whether everything finished (or nothing was to drain)."""
    from deployments.drain import wait_for_drain

    connect(config, address)
    if follow_s is not None and not wait_for_drain(follow_s):
        say(f"no drain began within {follow_s:g} s: nothing to wait for")
        return True
    drained = _drain(config, say, hold=True)
    say("the API refuses new requests until `anker drain --undo` or the cluster's end")
    return drained


def undrain(config: AnkerConfig, say: Say, address: str | None = None) -> None:
    from deployments.drain import stop_draining

    connect(config, address)
    stop_draining()
    say("drain called off: the ingress replicas serve again")


def _drain(config: AnkerConfig, say: Say, hold: bool) -> bool:
    from deployments.drain import drain_ingresses, stop_draining

    timeout_s = config.stack.drain_timeout_s
    say(f"draining: new requests get 503 with Retry-After, running ones finish (at most {timeout_s:g} s) ...")
    try:
        outcome = drain_ingresses(timeout_s, say, hold=hold)
    except BaseException:
        stop_draining()  # e.g. Ctrl-C: the ingress replicas serve again
        raise
    if outcome.drained:
        say(f"  drained in {outcome.seconds:.1f} s")
    else:
        say(
            f"  drain timed out: {outcome.running} requests still running and {outcome.pending_usage} usage "
            "reports pending (the ingress spools those for the next start)"
        )
    return outcome.drained


def _shutdown_serve(config: AnkerConfig, say: Say) -> None:
    try:
        import ray
        from ray import serve

        connect(config)
        _drain(config, say, hold=False)
        say("stopping Serve ...")
        serve.shutdown()
        ray.shutdown()
    except Exception as exc:  # the head is stopped below either way
        say(f"  Serve did not stop cleanly ({type(exc).__name__}); stopping the head anyway")


def _terminate_group(pid: int, timeout_s: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    # `ray start --block` drains the node and stops the Ray processes it started when it receives SIGTERM. Only the
    # head process gets it: signalling the whole group would kill the GCS under the drain, which then waits for it.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.5)
        _reap(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # whatever of the group is still there
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
