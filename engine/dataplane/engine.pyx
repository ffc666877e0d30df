# cython: language_level=3
"""The compiled session engine (design §4-§5): the session state machine and the table, one
extension module built from the include files below."""

include "counters.pxi"
include "session.pxi"
