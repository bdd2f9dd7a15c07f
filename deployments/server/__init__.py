"""The engine replica that serves the OpenAI API itself (the request path): vLLM's own serving layer over the
replica's ``AsyncLLM``, wrapped with what vLLM lacks (keys, admission, metering, zero-data-retention errors, a
parameter allow-list); HAProxy's model dispatch; and the ingress request router a model's application may have.
``deployments/builder.py::build_apps`` deploys them, and ``docs/architecture.md`` draws them.
"""
