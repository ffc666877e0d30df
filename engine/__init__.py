"""tcpcopy-mp: the replication engine (capture, session engine, raw send)."""

__version__ = "0.1.0"

PROG = "tcpcopy-mp"
"""The program's name in usage lines and one-line errors."""
EXIT_USAGE = 2
"""A command line or configuration that does not parse."""
EXIT_RUNTIME = 1
"""A run that could not go on (and spec §4.1 -t: what a negative value means)."""
