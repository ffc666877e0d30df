"""The schema (engine/core/config.py) as argparse options and TOML keys, for both programs.

* ``add_schema_arguments`` generates one argparse option per schema field;
* ``config_path`` finds a command line's ``--config FILE``;
* ``read_config_file`` loads a TOML file's ``[tcpcopy]`` / ``[intercept]`` table, checks every
  key and the TOML type of its value, and remembers the line of each key (tomllib gives none);
* ``ArgValues`` fills a parsed command line with the file's values where no flag was given and
  parses each through its field's ``Value``, errors naming the flag or the file line;
* ``OneLineArgumentParser`` is the argparse base both programs word their one-line errors on.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, Field, dataclass
from typing import Any

from engine.core.config import Choice, Converter, Flag, Value
from engine.errors import ConfigError

__all__ = [
    "PROGRAM_TABLES",
    "ArgValues",
    "ConfigFile",
    "OneLineArgumentParser",
    "add_schema_arguments",
    "config_path",
    "read_config_file",
]


def add_schema_arguments(
    parser: Any, options: Sequence[Field], sections: Sequence[str]
) -> dict[str, Any]:
    """Generate one argparse option per schema field, in argument groups named by section.

    Returns {section: group} so a program can add its non-schema options (--config).
    """
    groups = {s: parser.add_argument_group(s) for s in sections}
    for f in options:
        m = f.metadata
        names = [x for x in (m["short"], m["long"]) if x]
        kw: dict[str, Any] = {"dest": m["dest"], "help": m["help"] or None}
        kw["default"] = m["cli_default"]
        if m["action"]:
            kw["action"] = m["action"]
        if m["action"] != "store_true":
            if isinstance(m["parse"], Choice):
                kw["choices"] = m["parse"].choices
            else:
                kw["metavar"] = m["metavar"]
            if isinstance(m["parse"], Converter):
                kw["type"] = m["parse"].conv
        groups[m["section"]].add_argument(*names, **kw)
    return groups


def config_path(argv: Sequence[str]) -> str | None:
    """The `--config FILE` of a command line (the last one wins, as argparse would)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


# --------------------------------------------------------------------------------------------
# TOML files


@dataclass(frozen=True)
class ConfigFile:
    """The checked values of one program's table of a TOML file.

    values: {argparse dest: value in flag form} (text as on a command line; bool for flags;
    a list of text for repeatable flags).  where: {dest: "path:LINE: key 'k' (-f)"}, the
    location errors about that value name.
    """

    path: str
    table: str
    values: dict[str, Any]
    where: dict[str, str]

    def typed(self, options: Sequence[Field]) -> dict[str, Any]:
        """Values run through each field's parser now (intercept-mp, whose argparse types
        are its validators): {dest: value}; ConfigError(file:line: key ..., ...)."""
        by_dest = {f.metadata["dest"]: f for f in options}
        out: dict[str, Any] = {}
        for dest, value in self.values.items():
            parse = by_dest[dest].metadata["parse"]
            out[dest] = value if isinstance(parse, Flag) else parse(self.where[dest], value)
        return out


_TOML_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _toml_type(value: object) -> str:
    for t, name in _TOML_TYPE_NAMES.items():
        if isinstance(value, t):
            return f"{name} ({value!r})" if t in (str, int, float, bool) else name
    return type(value).__name__  # dates and times


def _flag_form(where: str, parse: Value, value: object) -> Any:
    """A TOML value checked against the field's TOML shape -> the flag's text form."""
    shape = parse.toml
    if shape == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"expected true or false, not {_toml_type(value)}")
    if shape == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(where, f"expected an integer, not {_toml_type(value)}")
    if shape == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(where, f"expected a number, not {_toml_type(value)}")
    if isinstance(value, str):
        return [value] if shape == "paths" else value
    if shape in ("list", "paths") and isinstance(value, list):
        scalar = (str,) if shape == "paths" else (str, int)
        if all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
            items = [str(v) for v in value]
            return items if shape == "paths" else ",".join(items)
        what = "strings" if shape == "paths" else "strings or integers"
        raise ConfigError(where, f"expected an array of {what}, not {_toml_type(value)}")
    wanted = "a string or an array" if shape in ("list", "paths") else "a string"
    raise ConfigError(where, f"expected {wanted}, not {_toml_type(value)}")


def _scan_lines(text: str) -> dict[tuple[str, str], int]:
    """{(table, key): line} of the plain `key = ...` lines and {(table, ""): line} of the
    `[table]` headers, found in the text (tomllib reports no positions).  Best effort:
    a key not found here is reported at line 1 of its table."""
    import re

    header = re.compile(r"\s*\[\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*\]\s*(#.*)?$")
    assign = re.compile(r"\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*(\.|=)")
    out: dict[tuple[str, str], int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        h = header.match(line)
        if h:
            table = h.group(1).strip("\"'")
            out.setdefault((table, ""), number)
            continue
        if line.lstrip().startswith("[["):
            table = "\0"  # arrays of tables: never a known table
            continue
        a = assign.match(line)
        if a:
            out.setdefault((table, a.group(1).strip("\"'")), number)
    return out


def read_config_file(path: str, table: str, options: Sequence[Field]) -> ConfigFile:
    """Load `path`: the `[table]` keys (and top-level keys, read as the same table).

    Other programs' tables (`[tcpcopy]`, `[intercept]`) are skipped, so one file may serve
    both.  Every error is one ConfigError: `path:LINE: unknown key 'foo' in [tcpcopy]`,
    `path:LINE: key 'workers' (--workers): expected an integer, ...`, or tomllib's own
    message (which has line and column) for a syntax error.
    """
    import tomllib

    from engine.io.privileges import check_open_file

    shown = path if path.isprintable() else ascii(path)  # one line, whatever the name holds

    try:
        with open(path, "rb") as f:
            check_open_file("--config", path, f.fileno())  # another user must not edit it
            raw = f.read()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ConfigError("--config", f"{shown}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{shown}: {exc}") from None
    lines = _scan_lines(text)
    by_key = {f.metadata["key"]: f for f in options}
    values: dict[str, Any] = {}
    where: dict[str, str] = {}

    def line_of(tbl: str, key: str) -> int:
        return lines.get((tbl, key)) or lines.get((tbl, ""), 1)

    def take(tbl: str, key: str, value: object) -> None:
        line = line_of(tbl, key)
        f = by_key.get(key)
        if f is None:
            hint = key.replace("-", "_")
            extra = f" (did you mean {hint!r}?)" if hint in by_key else ""
            raise ConfigError(f"{shown}:{line}", f"unknown key {key!r} in [{table}]{extra}")
        m = f.metadata
        if m["dest"] in values:
            raise ConfigError(f"{shown}:{line}", f"key {key!r} given twice for [{table}]")
        label = f"{shown}:{line}: key {key!r} ({m['short'] or m['long']})"
        values[m["dest"]] = _flag_form(label, m["parse"], value)
        where[m["dest"]] = label

    own = data.get(table)
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"{shown}:{line_of('', table)}", f"[{table}] must be a table")
    for key, value in data.items():  # in file order, so the first mistake is reported
        if isinstance(value, dict):
            if key == table:
                for own_key, own_value in value.items():
                    take(table, own_key, own_value)
            if key in PROGRAM_TABLES:
                continue
            raise ConfigError(
                f"{shown}:{line_of(key, '')}",
                f"unknown table [{key}] (expected {' or '.join(f'[{t}]' for t in PROGRAM_TABLES)})",
            )
        take("", key, value)
    return ConfigFile(path, table, values, where)


PROGRAM_TABLES = ("tcpcopy", "intercept")


class ArgValues:
    """A parsed command line with a config file's values filled in where no flag was given.

    ``get(name)`` parses the option of schema field `name` with its Value; errors name the
    flag as given (`-r`), or `file:LINE: key 'sample' (-r)` when the value came from the file.
    """

    def __init__(self, args: Any, options: Sequence[Field], file: ConfigFile | None) -> None:
        self.args = args
        self.by_name = {f.name: f for f in options}
        self.origin: dict[str, str] = {}
        if file is not None:
            for dest, value in file.values.items():
                if getattr(args, dest, None) is None and value is not False:
                    setattr(args, dest, value)
                    self.origin[dest] = file.where[dest]

    def _meta(self, name: str) -> Any:
        return self.by_name[name].metadata

    def raw(self, name: str) -> Any:
        return getattr(self.args, self._meta(name)["dest"])

    def where(self, name: str) -> str:
        m = self._meta(name)
        return self.origin.get(m["dest"]) or m["short"] or m["long"]

    @contextmanager
    def located(self, name: str) -> Iterator[None]:
        """Errors raised inside about a file value are re-worded to name the file line."""
        try:
            yield
        except ConfigError as exc:
            loc = self.origin.get(self._meta(name)["dest"])
            if loc is None or exc.where == loc:
                raise
            raise ConfigError(loc, exc.message) from None

    def default(self, name: str) -> Any:
        """The schema's value for an absent option, in the flag's unit (None: resolved by the
        program)."""
        return self._meta(name)["flag_default"]

    def get(self, name: str, default: Any = MISSING) -> Any:
        """The parsed value of option ``name``; when absent, ``default`` if given, else the
        schema's (``default(name)``)."""
        raw = self.raw(name)
        if raw is None:
            return self.default(name) if default is MISSING else default
        with self.located(name):
            return self._meta(name)["parse"](self.where(name), raw)


class OneLineArgumentParser(argparse.ArgumentParser):
    """Base of both programs' parsers: refuses a lone "--" value the way a missing value is
    refused (Python 3.11's argparse stores [] for ``--log=--``).  Subclasses word ``error``."""

    def _get_values(self, action, arg_strings):  # type: ignore[no-untyped-def]
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)
