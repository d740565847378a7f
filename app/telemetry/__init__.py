"""Telemetry: Prometheus metrics, OpenTelemetry traces, JSON logs."""
