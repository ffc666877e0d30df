"""intercept-mp: captures the target's responses and streams their headers to tcpcopy-mp."""

PROG = "intercept-mp"
"""The program's name in usage lines and one-line errors."""
