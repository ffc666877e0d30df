"""Thin I/O shells (design §4): capture sources, the shared-memory ring, raw send (and the
``_fastio`` C extension), intercept channels, the control block, logs, privileges, reports."""
