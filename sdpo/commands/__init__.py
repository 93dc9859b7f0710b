"""CLI sub-commands: each module here defines ``add_parser(subparsers)`` and is discovered by ``sdpo.cli``."""
