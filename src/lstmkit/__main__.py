"""The ``lstmkit`` command line: ``lstmkit demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstmkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="show lstmkit agreeing with torch.nn.LSTM, then train a tiny model"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lstmkit import demo

        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
