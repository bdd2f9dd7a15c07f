"""Tracing, metrics, dashboards and alert rules (issue 6); nothing here yet."""
