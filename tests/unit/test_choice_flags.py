"""Every choice flag of both programs arrives in the configuration the run uses.

The argparse options and the TOML keys are generated from the schema, but the configuration
objects are built field by field (engine/app/arguments.py ``build_config``, intercept/cli.py
``parse_args``): a field left out there would silently run with its default.  Each choice of
each Choice-typed option is given on the command line and must be the field's value.
"""

from __future__ import annotations

import pytest

from engine.app import cli
from engine.app.arguments import TCPCOPY_OPTIONS
from engine.core.config import Choice
from intercept import cli as icli
from intercept.config import INTERCEPT_OPTIONS

TCPCOPY_BASE = ["-x", "80-198.18.0.2:8080", "-s", "198.18.0.3"]
INTERCEPT_BASE = ["--queue-num", "0"]


def _cases(options: list) -> list[tuple[str, str, str]]:
    return [
        (f.name, f.metadata["long"], choice)
        for f in options
        if isinstance(f.metadata.get("parse"), Choice)
        for choice in f.metadata["parse"].choices
    ]


@pytest.mark.parametrize(("name", "flag", "choice"), _cases(TCPCOPY_OPTIONS))
def test_tcpcopy_choice_reaches_the_config(name: str, flag: str, choice: str) -> None:
    cfg = cli.build_config(cli.build_parser().parse_args([*TCPCOPY_BASE, flag, choice]))
    assert getattr(cfg, name) == choice


@pytest.mark.parametrize(("name", "flag", "choice"), _cases(INTERCEPT_OPTIONS))
def test_intercept_choice_reaches_the_options(name: str, flag: str, choice: str) -> None:
    opts = icli.parse_args([*INTERCEPT_BASE, flag, choice])
    assert getattr(opts, name) == choice


def test_the_cases_cover_sched_for_both_programs() -> None:
    assert ("sched", "--sched", "inherit") in _cases(TCPCOPY_OPTIONS)
    assert ("sched", "--sched", "inherit") in _cases(INTERCEPT_OPTIONS)
