"""The ``lstmkit`` command line: a command line argparse refuses is one line on stderr and
exit status 2, for the top level and every subcommand."""

from __future__ import annotations

import pytest

from lstmkit.__main__ import main


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--hidden-size", "1e7"], "--hidden-size: invalid int value: '1e7'"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--configs", "Q"], "--configs: expected a comma-separated subset"),
        (["sample"], "the following arguments are required"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_a_bad_command_line_is_one_line(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert named in lines[0] and "--help" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
