"""Dashboards and alert rules as code, without a stack: both dashboards build with Grafana's SDK from the shared
queries, the alert rules follow the config and pass promtool, and `anker grafana push` provisions through Grafana's
HTTP API (here a double of that API: no Grafana server runs in CI).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import load_config
from observability import queries
from observability.alerts import render, rule_groups
from observability.dashboards import dashboards, expressions
from testkit.prometheus import PROMTOOL

ANKER = str(Path(sys.executable).parent / "anker")
KNOWN_METRICS = re.compile(r"\bray_(anker_[a-z_]+|node_[a-z_]+|serve_[a-z_]+)\b")


def test_both_dashboards_build_from_the_shared_queries() -> None:
    built = dashboards()
    assert set(built) == {"anker-sre", "anker-business"}
    shared = {v for k, v in vars(queries).items() if k.isupper() and isinstance(v, str)}
    for expr in expressions():
        assert expr in shared, expr
        assert KNOWN_METRICS.search(expr), expr
    for model in built.values():
        for panel in model["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    titles = {p["title"] for p in built["anker-sre"]["panels"]}
    assert {"Time to first token", "Engine queue (vLLM waiting + running)", "Replicas wanted vs running"} <= titles


def test_alert_rules_follow_the_config_and_pass_promtool(tmp_path: Path) -> None:
    config = load_config()
    groups = {g["name"]: g["rules"] for g in rule_groups(config)["groups"]}
    assert set(groups) == {"anker-slo", "anker-capacity", "anker-billing"}
    fast = next(r for r in groups["anker-slo"] if r["alert"] == "AnkerSlowFirstTokenBurnRate1h")
    assert "> 0.144 and" in fast["expr"] and 'le="2.5"' in fast["expr"]  # 14.4 x (1 - 0.99), 2.5 s bucket
    floors = [r for r in groups["anker-capacity"] if r["alert"] == "AnkerReplicasBelowFloor"]
    assert len(floors) == len(config.models)
    rules = tmp_path / "anker.rules.yml"
    rules.write_text(render(config))
    assert yaml.safe_load(rules.read_text()) == rule_groups(config)
    check = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 12 rules found" in check.stdout, check.stdout + check.stderr


class GrafanaApiDouble:
    """Stands in for Grafana's HTTP API (folders and dashboards), recording what a push sends."""

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: list[dict[str, Any]] = []
        self.tokens: set[str] = set()
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                double.tokens.add(self.headers.get("Authorization", ""))
                uid = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/api/folders/") and uid in double.folders:
                    self._answer(200, double.folders[uid])
                else:
                    self._answer(404, {"message": "not found"})

            def do_POST(self) -> None:
                double.tokens.add(self.headers.get("Authorization", ""))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                if self.path == "/api/folders":
                    double.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
                    self._answer(200, double.folders[body["uid"]])
                elif self.path == "/api/dashboards/db":
                    double.dashboards.append(body)
                    uid = body["dashboard"]["uid"]
                    self._answer(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x"})
                else:
                    self._answer(404, {"message": "not found"})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def grafana() -> Iterator[GrafanaApiDouble]:
    double = GrafanaApiDouble()
    yield double
    double.close()


def test_grafana_push_provisions_the_dashboards_into_a_folder(grafana: GrafanaApiDouble) -> None:
    for _ in range(2):  # idempotent: the second push finds the folder and overwrites the dashboards
        out = subprocess.run(
            [ANKER, "grafana", "push", "--url", grafana.url, "--token", "glsa_test"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
    assert list(grafana.folders) == ["anker"]
    assert [d["dashboard"]["uid"] for d in grafana.dashboards] == ["anker-sre", "anker-business"] * 2
    assert all(d["folderUid"] == "anker" and d["overwrite"] is True for d in grafana.dashboards)
    assert grafana.tokens == {"Bearer glsa_test"}
    assert "glsa_test" not in out.stdout + out.stderr


def test_grafana_push_needs_a_token() -> None:
    out = subprocess.run(
        [ANKER, "grafana", "push", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "token" in out.stderr
