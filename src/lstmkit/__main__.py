"""The ``lstmkit`` command line: ``train``, ``sample``, ``plot`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

from lstmkit.bench import cli as bench
from lstmkit.train import cli as train


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is one line on stderr (exit 2), not the
    usage text and then the error; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lstmkit", description=__doc__)
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
