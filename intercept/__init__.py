"""intercept-mp: captures the target's responses and streams their headers to tcpcopy-mp."""
