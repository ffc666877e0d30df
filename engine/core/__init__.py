"""The Python reference engine (pure, design §4-§5): the session state table and its events
and states, the sessions of one worker (table), address rewriting, the flow gate (shed) and
the one config schema.  Imports the codecs and nothing that does I/O."""
