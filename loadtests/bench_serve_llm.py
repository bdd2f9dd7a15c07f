"""Ray Serve LLM (``ray.serve.llm.build_openai_app``) on the bench's model, as a child process of the benchmark.

It starts a Ray instance of its own (``address="local"``: never a cluster it finds, never port 6379), serves the
model on loopback until SIGTERM, then shuts Serve and that Ray instance down. It logs no request content.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Any

# Ray Serve LLM places its engine only when Ray advertises more logical CPUs than this machine's 2 real cores.
RAY_LOGICAL_CPUS = 8


def llm_config(model: str, path: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> Any:
    """One replica of the model on CPU with the given vLLM engine arguments and engine environment."""
    from ray.serve.llm import LLMConfig

    return LLMConfig.model_validate(
        {
            "model_loading_config": {"model_id": model, "model_source": path},
            "engine_kwargs": engine_kwargs,
            "runtime_env": {"env_vars": env},
            "accelerator_config": {"kind": "cpu"},
            "deployment_config": {"num_replicas": 1},
        }
    )


def direct_streaming_env() -> dict[str, str]:
    """Ray Serve LLM's direct streaming: the LLM server is the application's ingress, reached through Serve's
    HAProxy, whose config and sockets go in a short folder of this run's own, and its listeners on free ports."""
    from testkit.ports import free_port

    folder = tempfile.mkdtemp(prefix="bsl-", dir="/tmp")
    return {
        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),  # shared by SO_REUSEPORT with any other stack's
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
    }


def serve_until_stopped(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    engine_kwargs = json.loads(args.engine_kwargs)
    env = json.loads(args.env)
    ray.init(
        address="local",
        num_cpus=RAY_LOGICAL_CPUS,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_openai_app({"llm_configs": [llm_config(args.model, args.path, engine_kwargs, env)]})
        serve.run(app, name="ray-serve-llm", route_prefix="/")
        print("bench-serve-llm: ready", flush=True)
        stop.wait()
    finally:
        print("bench-serve-llm: stopping", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--path", required=True, help="checkpoint folder")
    parser.add_argument("--port", type=int, required=True, help="loopback HTTP port of Serve's proxy")
    parser.add_argument("--engine-kwargs", required=True, help="vLLM engine arguments as a JSON object")
    parser.add_argument("--env", default="{}", help="engine environment as a JSON object")
    parser.add_argument(
        "--direct", action="store_true", help="Ray Serve LLM's direct streaming behind Serve's HAProxy (one model)"
    )
    args = parser.parse_args(argv)
    if args.direct:
        os.environ.update(direct_streaming_env())  # before Ray is imported: its constants are read then
    return serve_until_stopped(args)


if __name__ == "__main__":
    sys.exit(main())
