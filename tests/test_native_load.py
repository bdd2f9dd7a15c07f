"""The native load client's report and the profile's sorting (loadtests/native_load.py), on wrk's and py-spy's own
output formats; the benchmark test runs both tools for real."""

from __future__ import annotations

import pytest

from loadtests.native_load import _parse, read_profile

WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:51915/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   171.40ms   22.86ms   1.09s    76.69%
    Req/Sec   370.06     72.98   610.00     81.25%
  Latency Distribution
     50%  172.43ms
     75%  184.03ms
     90%  950.00us
     99%    1.20s
  2952 requests in 8.01s, 3.55MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:    368.52
Transfer/sec:    453.81KB
"""


def test_a_wrk_report_is_read_with_its_units_and_its_failures() -> None:
    run = _parse(WRK_OUTPUT, stream=False, connections=64, cpu_s=0.2)
    assert (run.requests, run.not_2xx, run.socket_errors, run.successes) == (2952, 12, 3, 2940)
    assert run.seconds == 8.01 and run.requests_per_s == 2940 / 8.01
    assert run.latency_ms == pytest.approx({"50%": 172.43, "75%": 184.03, "90%": 0.95, "99%": 1200.0})
    clean = _parse(WRK_OUTPUT.replace("  Non-2xx or 3xx responses: 12\n", "").replace("read 2", "read 0"), True, 4, 0)
    assert clean.not_2xx == 0 and clean.socket_errors == 1


def test_profile_samples_count_for_the_innermost_package_on_the_stack() -> None:
    raw = "\n".join(
        [
            "thread (1): loop;run (asyncio/events.py:80);__call__ (deployments/server/gate.py:12);"
            "create (vllm/entrypoints/openai/serving.py:3);validate (pydantic/main.py:9) 6",
            "thread (1): loop;run (asyncio/events.py:80);__call__ (deployments/server/gate.py:12);"
            "dumps (json/__init__.py:2) 3",
            "thread (2): worker;_worker (concurrent/futures/thread.py:83) 1",
        ]
    )
    profile = read_profile(raw, seconds=1.0, rate_hz=20)
    assert profile.samples == 10 and profile.gil_share == 0.5
    assert profile.by_owner == {"vLLM": 6, "Anker": 3, "other (event loop, gRPC, standard library)": 1}
    assert profile.by_function[("vLLM", "create (vllm/entrypoints/openai/serving.py)")] == 6
