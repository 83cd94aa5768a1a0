"""The ``lstmkit`` command line: ``train``, ``sample``, ``plot`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

from lstmkit.bench import cli as bench
from lstmkit.train import cli as train


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstmkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_arguments(commands)
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="time lstmkit against torch.nn.LSTM and a naive LSTM; write json/md/png",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
