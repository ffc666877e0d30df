"""intercept-mp's exceptions: one base class, each error carrying its data.

``str()`` of any of them is the one line the user sees (``where: message``); the CLI logs it
and exits non-zero, never with a traceback.
"""

from __future__ import annotations

__all__ = ["InterceptError", "PcapError", "RuleError", "StartError", "UsageError"]


class InterceptError(Exception):
    """Base: a step of intercept-mp that cannot go on.  ``where`` names the flag concerned
    ("" when none does), ``message`` says what went wrong."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


class UsageError(InterceptError):
    """A command line that does not parse (the doctor's parser raises it)."""


class RuleError(InterceptError):
    """iptables failed: ``sport`` is the rule's source port (None when iptables could not
    even run)."""

    def __init__(self, where: str, message: str, sport: int | None = None) -> None:
        super().__init__(where, message)
        self.sport = sport


class PcapError(InterceptError):
    """No capture device could be opened, or the filter does not compile: ``devices`` are the
    names tried, ``filter_expr`` the -F expression."""

    def __init__(
        self, where: str, message: str, devices: tuple[str, ...] = (), filter_expr: str = ""
    ) -> None:
        super().__init__(where, message)
        self.devices = devices
        self.filter_expr = filter_expr


class StartError(InterceptError):
    """A start-up phase failed (listen, the packet source, the pid file, the privilege drop,
    the exporter)."""
