"""The engine replica that serves the OpenAI API itself (the second edition's request path): vLLM's own serving
layer over the replica's ``AsyncLLM``, wrapped with what vLLM lacks (metering, zero-data-retention errors, a
parameter allow-list). It is built beside the first edition's Ingress -> Tokenizer -> Engine path and is not yet
what ``build_app`` deploys; ``docs/architecture.md`` says how far it is.
"""
