"""tcpcopy-mp: the program (console script).  ``tcpcopy-mp doctor ...`` runs engine/app/doctor.py.

The command line itself (C tcpcopy's flags, spec §4.1, plus long names; the --config file;
one-line errors, exit status 2) is parsed by engine/app/arguments.py; this module runs it: logs,
-d, -P, the least-privilege drop, then the supervisor.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from engine import EXIT_RUNTIME, EXIT_USAGE
from engine.app.arguments import (
    PROG,
    TCPCOPY_OPTIONS,
    UsageError,
    apply_config_file,
    build_config,
    build_parser,
    config_path,
    parse_config,
)
from engine.core.config import ReplayConfig
from engine.errors import ConfigError
from engine.io import privileges
from engine.io.sigloop import daemonize

__all__ = [
    "TCPCOPY_OPTIONS",
    "build_config",
    "build_parser",
    "main",
    "parse_config",
]

# The names this module had before the parser moved to engine/app/arguments.py.
_UsageError = UsageError
_config_path = config_path
_apply_config_file = apply_config_file


# --------------------------------------------------------------------------------------------


def _usage_error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "doctor":
        from engine.app.doctor import main as doctor_main

        return doctor_main(args_list[1:])
    parser = build_parser()
    try:
        path = config_path(args_list)
        if path:
            apply_config_file(parser, path)
        args = parser.parse_args(args_list)
        cfg = build_config(args)
        target = privileges.resolve_target(args.user, args.group)
    except UsageError as exc:
        return _usage_error(str(exc))
    except ConfigError as exc:
        return _usage_error(str(exc))

    from engine.io.logs import setup_logging

    try:
        logger = setup_logging(cfg.log_path, cfg.log_format)
    except OSError as exc:
        return _usage_error(f"-l: cannot open {cfg.log_path}: {exc.strerror or exc}")
    if cfg.daemon:
        daemonize()
    if args.pid_file:
        try:
            with open(args.pid_file, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            return _usage_error(f"-P: cannot write {args.pid_file}: {exc.strerror or exc}")
    _log_ignored(logger, cfg, args)

    # Every worker count, 1 included, runs the supervisor's multi-process engine: one code path.
    from engine.proc.supervisor import Supervisor

    try:
        # Least privilege (engine/io/privileges.py): before the supervisor creates its shared
        # memory and sockets, so all of it belongs to the user that runs from here on.
        kept = privileges.keep_files(
            target,
            inputs=cfg.pcap_files if cfg.capture == "offline" else (),
            outputs=[cfg.summary_json] if cfg.summary_json else (),
        )
        privileges.warn_unreachable_log(logger, target, cfg.log_path)
        privileges.enter_least_privilege(
            PROG,
            target,
            logger,
            needed=privileges.KEEP_CAPS_MASK,
            needed_for="raw send and capture sockets, -B buffers",
        )
    except OSError as exc:
        logger.error("cannot drop privileges: %s", exc)
        print(f"{PROG}: cannot drop privileges: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    factory = None
    if target is not None and cfg.capture == "offline":
        factory = privileges.pcap_sources_factory(kept)
    try:
        return Supervisor(cfg, sources_factory=factory).run()
    except ConfigError as exc:  # raised at start-up: --metrics cannot listen
        logger.error("%s", exc)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except PermissionError as exc:
        logger.error("%s (tcpcopy-mp needs root or CAP_NET_RAW)", exc)
        print(f"{PROG}: {exc.strerror or exc}: needs root or CAP_NET_RAW", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        logger.error("%s", exc)
        print(f"{PROG}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _log_ignored(logger: logging.Logger, cfg: ReplayConfig, args: argparse.Namespace) -> None:
    """Say which compatibility flags have no effect, so nobody tunes a dead knob."""
    if cfg.capture == "raw" and cfg.interfaces:
        logger.info("-i is used by --capture packet only; the raw socket sees every device")
    for flag, value in (
        ("-U", cfg.pool_size_kb),
        ("-S", cfg.snaplen),
    ):
        if value is not None:
            logger.info("%s is accepted for compatibility and has no effect", flag)
    if cfg.output_interface is None and any(t.target_mac for t in cfg.session.transfers):
        logger.info("the MACs in -x are used with -o DEV only (link-layer send)")


if __name__ == "__main__":
    sys.exit(main())
