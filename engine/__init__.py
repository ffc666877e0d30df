"""tcpcopy-mp: the replication engine (capture, session engine, raw send)."""

__version__ = "0.1.0"
