"""`prmkd-dist` command line. Each concern registers its own sub-commands in its own module
(`<module>.register(subparsers)`); this file only lists them, so adding a command never edits another's."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it defines register(subparsers) adding one or more commands
_COMMAND_MODULES = [
    "prmkd_dist.data.cli",      # data prepare|stats
    "prmkd_dist.train.cli",     # train, eval, quickstart
    "prmkd_dist.data.shards_cli",  # shards inspect|validate|stats|merge
    "prmkd_dist.serve.cli",     # export, recommend
    "prmkd_dist.teachers.cli",  # teachers train|export|eval|pipeline
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prmkd-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that concern is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
