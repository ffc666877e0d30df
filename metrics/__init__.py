"""Shared counters and the Prometheus exporter."""
