"""The engine replica that serves the OpenAI API itself (the second edition's request path): vLLM's own serving
layer over the replica's ``AsyncLLM``, wrapped with what vLLM lacks (metering, zero-data-retention errors, a
parameter allow-list). It is what ``build_apps`` deploys, the default; the first edition's Ingress -> Tokenizer ->
Engine path (``build_app``) goes next, and ``docs/architecture.md`` says how far that is.
"""
