"""The ``sdpo`` command line: sub-commands are discovered from :mod:`sdpo.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import sdpo.commands
from sdpo import __version__
from sdpo.errors import SdpoError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config params.yaml`` and repeated ``--set key=value`` overrides (dotted keys)."""
    parser.add_argument("--config", default="params.yaml",
                        help="parameter file (default: params.yaml); data.root in it says where the run lives")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter with a dotted key, e.g. --set train.mu=0.5 (repeatable)",
    )


def load_context(args: argparse.Namespace):
    """The :class:`sdpo.stages.StageContext` of ``--config`` and ``--set``."""
    from sdpo.stages import StageContext

    return StageContext.load(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo", description="Diffusion-SDPO: safeguarded preference optimisation for diffusion models."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="keep the libraries' loading bars and warnings (or SDPO_LOG_LEVEL=DEBUG|INFO)")
    parser.add_argument("--version", action="version", version=f"sdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(sdpo.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"sdpo.commands.{info.name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sdpo.logs import configure_logging

    configure_logging(True if args.verbose else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SdpoError as err:
        print(f"sdpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
