"""The engine's exception tree. Every error carries its data; users see one line (str(e))."""


class TcpcopyError(Exception):
    """Base of every error tcpcopy-mp raises on purpose."""


class DecodeError(TcpcopyError, ValueError):
    """Bytes that do not decode: a packet, a wire record, a frame, a pcap file."""


class ConfigError(TcpcopyError, ValueError):
    """A bad flag, TOML key or value. `where` names the flag (`-x`), key or `file:line`."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
