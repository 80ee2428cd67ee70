"""The command line: help, and the speed table on a tiny model."""

import pytest

from adacache_fx.tools.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "speed", "compile-bench", "export"):
        assert command in out


def test_speed_prints_a_row_per_granularity(capsys):
    args = ["speed", "--layers", "2", "--heads", "2", "--head-dim", "8", "--frames", "2", "--size", "8",
            "--steps", "6", "--codebook", "never", "--repeats", "1", "--threads", "1"]
    assert main(args) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"baseline", "stack", "block", "branch"}
    assert rows["stack"][1] == "6"  # never-skip codebook: every step computed
    assert float(rows["stack"][-1]) == 0.0  # and the output equals the baseline
    assert float(rows["block"][4]) > float(rows["stack"][4])  # a cache per block holds more than one per stack
