"""The `anker` command: start and stop the local stack, build tiny models, manage organisations, keys, usage and
invoices, check a config.

It parses arguments, loads the config once and calls into ``cluster.local``, ``cluster.tiny_models`` and (through
``cluster.cli_billing``) the billing layer; it prints a key only when it is created, and never request content.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cluster import cli_billing
from config.schema import AnkerConfig, ConfigError
from config.settings import DEFAULT_PROFILE, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

EPILOG = """\
examples:
  anker up                              start the local stack in the foreground (Ctrl-C stops it)
  anker up --detach                     start it in the background; `anker down` stops it
  anker status                          what runs, and whether every model is ready
  anker keys create --tenant kommune-x  create an API key (printed once, on the last line)
  anker keys create --tenant kommune-x --role admin --budget-dkk 500 --rpm 60 --models region:dk
  anker tenants set kommune-x --plan monthly --monthly-fee-dkk 2000 --discount-percent 10
  anker usage --tenant kommune-x --month 2026-11
  anker invoice --tenant kommune-x --month 2026-11 --out invoices/
  anker plan --profile config/profiles/qwen35-397b-fp8-h200-tp8.yaml --input-tokens-per-s 20000
  anker model build --out ./m --arch qwen3-moe
  ANKER_PORT=8001 anker up              any config field can be overridden from the environment

exit codes: 0 ok, 1 failed, 2 bad usage or config, 3 not running (status)
"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("anker")
    except metadata.PackageNotFoundError:
        return "unknown"


def _say(message: str) -> None:
    print(message, flush=True)


def _config(args: argparse.Namespace) -> AnkerConfig:
    config = load_config(args.config)
    overrides: dict[str, object] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if overrides:
        server = config.server.model_validate({**config.server.model_dump(), **overrides})
        config = config.model_copy(update={"server": server})
    return config


def _usage_examples(config: AnkerConfig, key: str | None, base_url: str) -> str:
    model = config.models[0].name
    shell_key = key or "$ANKER_API_KEY"
    python_key = f'"{key}"' if key else 'os.environ["ANKER_API_KEY"]'
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hej!"}}], "max_tokens": 16}}'
    lines = [
        "",
        "Call it with curl:",
        f"  curl {base_url}/v1/chat/completions \\",
        f'    -H "Authorization: Bearer {shell_key}" -H "Content-Type: application/json" \\',
        f"    -d '{body}'",
        "",
        "or with the openai SDK:",
        "  import os",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base_url}/v1", api_key={python_key})',
        f'  r = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hej!"}}])',
        "  print(r.choices[0].message.content, r.usage)",  # zdr-ok: example code shown to the user
        "",
    ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    from cluster import local
    from deployments.keys import open_key_store

    config = _config(args)
    first_key = None
    if open_key_store(config.data_dir, config.database_url, secrets_dir=config.secrets_dir).count_active() == 0:
        # The first key runs its organisation: it calls models and manages keys. Made (and audited) like any other.
        _, first_key = cli_billing.service(config).governance.create_key(cli_billing.actor(), "default", role="owner")
    try:
        state = local.start(config, _say)
    except local.StackError as exc:
        print(f"anker up: {exc}", file=sys.stderr)
        return EXIT_FAILED

    _say(f"\nAnker is serving {', '.join(m.name for m in config.models)} on {state.base_url}")
    _say(f"Ray dashboard: {state.dashboard_url} (loopback only)")
    if first_key:
        _say("\nA first API key was created for tenant `default`. It is shown only now; keep it safe:")
        _say(f"  export ANKER_API_KEY={first_key}")
    else:
        _say("\nAPI keys exist already; create another with `anker keys create --tenant NAME`.")
    _say(_usage_examples(config, first_key, state.base_url))
    if args.detach:
        _say("Running in the background; stop it with `anker down`.")
        return EXIT_OK

    _say("Press Ctrl-C to stop.")
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            if not local.pid_alive(state.head_pid):
                print("anker up: the Ray head exited unexpectedly", file=sys.stderr)
                local.stop(config, _say)
                return EXIT_FAILED
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _say("\nstopping ...")
        local.stop(config, _say)
        _say("stopped")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from cluster import local

    config = _config(args)
    if not local.stop(config, _say):
        _say(f"nothing runs from {config.data_dir}")
        return EXIT_OK
    _say("stopped")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    from cluster import local

    config = _config(args)
    if args.undo:
        local.undrain(config, _say, args.address)
        return EXIT_OK
    return EXIT_OK if local.drain(config, _say, args.address, args.follow) else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from cluster import local

    config = _config(args)
    state = local.read_state(config)
    if state is None or not local.pid_alive(state.head_pid):
        report = {"running": False, "data_dir": str(config.data_dir)}
        _say(json.dumps(report) if args.json else f"not running (data folder {config.data_dir})")
        return EXIT_NOT_RUNNING
    code, body = local.health(state.base_url)
    models = {name: bool(v.get("ready")) for name, v in body.get("models", {}).items()}
    healthy = code == 200
    if args.json:
        _say(
            json.dumps(
                {
                    "running": True,
                    "healthy": healthy,
                    "url": state.base_url,
                    "head_pid": state.head_pid,
                    "dashboard": state.dashboard_url,
                    "models": models,
                }
            )
        )
    else:
        _say(f"running: {state.base_url}  (Ray head pid {state.head_pid}, GCS {state.gcs_address})")
        _say(f"dashboard: {state.dashboard_url}")
        _say(f"health: {'ok' if healthy else 'NOT READY' if code else 'no answer from /healthz'}")
        for name in (m.name for m in config.models):
            _say(f"  {name:<24} {'ready' if models.get(name) else 'not ready'}")
    return EXIT_OK if healthy else EXIT_FAILED


def cmd_model_build(args: argparse.Namespace) -> int:
    from cluster.tiny_models import build_model

    started = time.monotonic()
    built = build_model(Path(args.out), args.arch)
    size = sum(p.stat().st_size for p in built.path.iterdir() if p.is_file())
    _say(
        f"built {built.arch} in {built.path}: {built.num_parameters:,} parameters, vocab {built.vocab_size}, "
        f"{size / 1e6:.1f} MB, {time.monotonic() - started:.1f}s"
    )
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from decimal import Decimal, InvalidOperation

    from cluster.capacity import cost_plan, figures, replica_plan

    config = _config(args)
    try:
        load = [Decimal(v) for v in (args.input_tokens_per_s, args.output_tokens_per_s, args.cached_share)]
    except InvalidOperation:
        print("anker plan: token rates and --cached-share must be numbers", file=sys.stderr)
        return EXIT_USAGE
    if not Decimal(0) <= load[2] <= Decimal(1) or min(load) < 0:
        print("anker plan: rates must be >= 0 and --cached-share within 0..1", file=sys.stderr)
        return EXIT_USAGE
    planned = 0
    for model in config.models:
        if model.facts is None or model.accelerator != "gpu":
            _say(f"{model.name}: a CPU model without checkpoint figures; nothing to plan")
            continue
        planned += 1
        replica = replica_plan(model)
        _say(f"{model.name} ({model.hardware.gpu_type}, {model.hardware.gpus_per_node} GPUs per node)")
        _say(
            f"  per replica: {replica.gpus} GPUs on {replica.nodes} node(s), TP {model.tensor_parallel_size} x "
            f"PP {model.pipeline_parallel_size} x DP {model.data_parallel_size}"
            f"{' + expert parallel' if model.enable_expert_parallel else ''}"
            f"{f', only in region {model.residency}' if model.residency else ''}"
        )
        for line in figures(model)[1:]:
            _say("  " + line.removeprefix("#   "))
        for label, replicas in (("floor", model.min_replicas), ("ceiling", model.max_replicas)):
            cost = cost_plan(model, replicas, *load)
            _say(
                f"  {label:<7} {replicas} replica(s): {cost.gpus} GPUs on {cost.nodes} node(s), "
                f"{cost.cost_per_hour_dkk} DKK/hour at {model.hardware.gpu_hour_price_dkk} DKK per GPU-hour"
            )
        revenue = cost_plan(model, model.min_replicas, *load).revenue_per_hour_dkk
        _say(
            f"  revenue at {load[0]} input tokens/s ({load[2] * 100:g} % cached) and {load[1]} output tokens/s: "
            f"{revenue} DKK/hour"
        )
    return EXIT_OK if planned else EXIT_FAILED


def cmd_cluster_defs(args: argparse.Namespace) -> int:
    from cluster import kuberay

    profile = Path(args.config) if args.config else DEFAULT_PROFILE
    config = _config(args)
    if not any(m.accelerator == "gpu" for m in config.models):
        print(f"anker cluster-defs: {profile} has no GPU model to run on a cluster", file=sys.stderr)
        return EXIT_USAGE
    out_dir = Path(args.out)
    if args.check:
        stale = [
            relative
            for relative, content in kuberay.definitions(config, profile).items()
            if not (out_dir / relative).exists() or (out_dir / relative).read_text(encoding="utf-8") != content
        ]
        for relative in stale:
            print(f"out of date: {out_dir / relative} (run `anker cluster-defs --profile {profile}`)", file=sys.stderr)
        return EXIT_FAILED if stale else EXIT_OK
    for path in kuberay.write(config, profile, out_dir):
        _say(f"wrote {path}")
    return EXIT_OK


def cmd_alerts(args: argparse.Namespace) -> int:
    from observability.alerts import render

    text = render(_config(args))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        _say(f"wrote {args.out}")
    else:
        print(text, end="")
    return EXIT_OK


def cmd_grafana_export(args: argparse.Namespace) -> int:
    from observability.dashboards import dashboards

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for uid, model in dashboards().items():
        (out / f"{uid}.json").write_text(json.dumps(model, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _say(f"wrote {out / f'{uid}.json'}")
    return EXIT_OK


def cmd_grafana_push(args: argparse.Namespace) -> int:
    import os

    from observability.grafana import push

    token = args.token or os.environ.get("GRAFANA_TOKEN")
    if not token:
        print(
            "anker grafana push: give --token or set GRAFANA_TOKEN (a Grafana service-account token)", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        urls = push(args.url, token, verify=not args.insecure)
    except Exception as exc:  # the HTTP client's errors: say which, never the token
        print(f"anker grafana push: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for url in urls:
        _say(f"pushed {url}")
    return EXIT_OK


def cmd_compliance_report(args: argparse.Namespace) -> int:
    import os

    from cluster import compliance
    from config.settings import config_path_from_env

    source = Path(args.config) if args.config else config_path_from_env()
    for path in compliance.write(_config(args), os.environ, str(source), Path(args.out)):
        _say(f"wrote {path}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _config(args)
    _say(f"config ok: data folder {config.data_dir}")
    _say(f"  server  http://{config.server.host}:{config.server.port}")
    _say(
        f"  ray     GCS port {config.ray.gcs_port}, {config.ray.num_cpus} logical CPUs, dashboard "
        f"{config.ray.dashboard_host}:{config.ray.dashboard_port}"
    )
    for m in config.models:
        _say(
            f"  model   {m.name}: {config.model_path(m)}  TP {m.tensor_parallel_size} x PP "
            f"{m.pipeline_parallel_size}, replicas {m.min_replicas}..{m.max_replicas}, context {m.max_model_len}, "
            f"DKK/1M in {m.prices.input_uncached_dkk_per_mtok} (cached {m.prices.input_cached_dkk_per_mtok}) "
            f"out {m.prices.output_dkk_per_mtok}"
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anker",
        description="Anker: a sovereign, OpenAI-compatible LLM serving platform on Ray Serve and vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anker {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    default_config = (
        DEFAULT_PROFILE.relative_to(Path.cwd()) if DEFAULT_PROFILE.is_relative_to(Path.cwd()) else DEFAULT_PROFILE
    )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", metavar="PATH", default=None, help=f"YAML config (default: $ANKER_CONFIG or {default_config})"
        )
        return p

    up = with_config(
        sub.add_parser(
            "up",
            help="start the local stack (Ray head, Serve, engines) and wait until it is ready",
            description="Build missing tiny models, make sure an API key exists, start a local Ray head, deploy "
            "Anker on Ray Serve and wait until every model is ready.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    server = up.add_argument_group("server")
    server.add_argument("--host", help="address the API listens on (default from config: 127.0.0.1)")
    server.add_argument("--port", type=int, help="port the API listens on (default from config: 8000)")
    up.add_argument("--detach", action="store_true", help="return once ready, leaving the stack running")
    up.set_defaults(func=cmd_up)

    down = with_config(
        sub.add_parser(
            "down",
            help="stop the stack that `anker up` started",
            description="Drain, then stop Serve and the Ray head started from this data folder. Draining: new "
            "requests get 503 with Retry-After while running ones finish, for at most stack.drain_timeout_s.",
        )
    )
    down.set_defaults(func=cmd_down)

    drain = with_config(
        sub.add_parser(
            "drain",
            help="drain the API for maintenance or a pod's stop, without stopping anything",
            description="New requests get 503 with Retry-After while running ones finish (at most "
            "stack.drain_timeout_s); the API then keeps refusing until `anker drain --undo` or the cluster's end. "
            "Exit 0 once drained, 1 if the timeout passed first. KubeRay pods run it as their stop hook.",
        )
    )
    drain.add_argument(
        "--address",
        metavar="ADDR",
        help="another Ray cluster (auto: the one this node belongs to, as in a KubeRay pod; Ray's token from the "
        "environment); default: the stack that `anker up` started from this data folder",
    )
    drain.add_argument(
        "--follow",
        type=float,
        metavar="SECONDS",
        help="drain only if another drain begins within SECONDS (a worker pod following its head pod's drain)",
    )
    drain.add_argument("--undo", action="store_true", help="call a drain off: the API serves again")
    drain.set_defaults(func=cmd_drain)

    status = with_config(
        sub.add_parser(
            "status",
            help="say what runs and whether every model is ready",
            description="Exit 0 when running and healthy, 1 when running but not ready, 3 when not running.",
        )
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)

    model = sub.add_parser("model", help="build tiny local models").add_subparsers(
        dest="model_command", metavar="ACTION", required=True
    )
    build = model.add_parser(
        "build",
        help="write a tiny deterministic random-weight model",
        description="Write a deterministic random-weight checkpoint of a few MB with a "
        "locally trained byte-level BPE tokenizer and a ChatML template.",
    )
    build.add_argument("--out", required=True, metavar="DIR", help="folder to write the checkpoint to")
    build.add_argument(
        "--arch",
        choices=["qwen3-next", "qwen3-moe"],
        default="qwen3-next",
        help="qwen3-next: hybrid Gated-DeltaNet + attention MoE with a shared expert (the family "
        "of Qwen3.5); qwen3-moe: plain attention MoE (default: qwen3-next)",
    )
    build.set_defaults(func=cmd_model_build)

    cli_billing.add_commands(sub, with_config, _config)

    plan = sub.add_parser(
        "plan",
        help="capacity plan of a GPU profile: GPUs, nodes, replicas, cost per hour against token revenue",
        description="GPUs and nodes per replica and at the replica floor and ceiling, memory figures, cost per hour "
        "from the profile's GPU-hour price, and the token revenue per hour at a given load.",
    )
    plan.add_argument("--profile", "--config", dest="config", metavar="PATH", help="the profile (a config YAML)")
    plan.add_argument("--input-tokens-per-s", default="5000", metavar="N", help="prompt tokens per second (5000)")
    plan.add_argument("--output-tokens-per-s", default="500", metavar="N", help="output tokens per second (500)")
    plan.add_argument("--cached-share", default="0.5", metavar="F", help="share of prompt tokens cached (0.5)")
    plan.set_defaults(func=cmd_plan)

    defs = sub.add_parser(
        "cluster-defs",
        help="write the KubeRay RayService and Ray cluster launcher config generated from a GPU profile",
        description="Generate the cluster definitions of a profile (so they cannot drift from it): a KubeRay "
        "RayService with the profile as a ConfigMap and a NetworkPolicy, and a Ray cluster launcher config.",
    )
    defs.add_argument("--profile", "--config", dest="config", metavar="PATH", required=True, help="a GPU profile")
    defs.add_argument("--out", default=str(Path(__file__).parent), metavar="DIR", help="default: cluster/")
    defs.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ from the profile")
    defs.set_defaults(func=cmd_cluster_defs)

    alerts = with_config(
        sub.add_parser(
            "alerts",
            help="print the Prometheus alert rules generated from the config",
            description="SLO burn rates (first token, 5xx), engine queues above target, replicas below floor, usage "
            "pending: Prometheus rule groups, checked with promtool by the tests.",
        )
    )
    alerts.add_argument("--out", metavar="FILE", help="write them to FILE instead of stdout")
    alerts.set_defaults(func=cmd_alerts)

    grafana = sub.add_parser("grafana", help="Anker's Grafana dashboards (SRE, business)").add_subparsers(
        dest="grafana_command", metavar="ACTION", required=True
    )
    push = grafana.add_parser("push", help="provision the dashboards into a Grafana (folder Anker)")
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. https://grafana.example.dk")
    push.add_argument("--token", help="a service-account token (default: $GRAFANA_TOKEN)")
    push.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    push.set_defaults(func=cmd_grafana_push)
    export = grafana.add_parser("export", help="write the dashboards' JSON models to a folder")
    export.add_argument("--out", required=True, metavar="DIR")
    export.set_defaults(func=cmd_grafana_export)

    compliance = sub.add_parser("compliance", help="GDPR and NIS2 documents generated from the config").add_subparsers(
        dest="compliance_command", metavar="ACTION", required=True
    )
    report = with_config(
        compliance.add_parser(
            "report",
            help="write the GDPR Art. 30 record, the data flows and the NIS2 incident runbook (Markdown)",
            description="Generate, from the running configuration (environment overrides included): the record of "
            "processing activities (GDPR Art. 30) with the data the database retains, the data flows between every "
            "component and port, and the NIS2 incident runbook for every alert rule. Credentials never appear.",
        )
    )
    report.add_argument("--out", default="compliance", metavar="DIR", help="folder to write to (default: compliance)")
    report.set_defaults(func=cmd_compliance_report)

    config = sub.add_parser("config", help="check a config file").add_subparsers(
        dest="config_command", metavar="ACTION", required=True
    )
    check = with_config(config.add_parser("check", help="validate the config and print what it describes"))
    check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"anker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
