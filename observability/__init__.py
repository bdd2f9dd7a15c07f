"""Observability: tracing (OpenTelemetry), metrics (Ray metrics, Prometheus format), Grafana dashboards and alert rules
as code. Nothing here ever records prompt or completion text."""
