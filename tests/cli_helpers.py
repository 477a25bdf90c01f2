"""What the CLI tests share: running the command in-process, and the one-line error contract."""
from __future__ import annotations

from densenet_fast import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``densenet-fast *argv`` in this process: (exit status, stdout, stderr)."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
