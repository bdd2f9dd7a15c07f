"""The ingress's handle calls: each engine call is its own Serve request (deployments/ingress.py)."""

from __future__ import annotations

import ray.serve.context

from deployments.ingress import own_serve_request


def test_each_engine_call_gets_its_own_serve_request_id_and_the_http_requests_id_comes_back() -> None:
    ray.serve.context._set_request_context(route="/v1/completions", request_id="r-1", _internal_request_id="http-1")
    try:
        seen = []
        for _ in range(2):
            with own_serve_request():
                inner = ray.serve.context._get_serve_request_context()
                seen.append(inner._internal_request_id)
                assert inner.request_id == "r-1" and inner.route == "/v1/completions"  # only the tracking id changes
        assert "http-1" not in seen and len(set(seen)) == 2
        assert ray.serve.context._get_serve_request_context()._internal_request_id == "http-1"
    finally:
        ray.serve.context._unset_request_context()
