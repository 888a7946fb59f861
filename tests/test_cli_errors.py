"""A newcomer's mistakes end in one line that names the fix, not a traceback (issue 18, part)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import host
from protocol.errors import InvalidInputError


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "--task", "digit"], "unknown task 'digit' (known: digits"),
    (["compare", "--task", "digit"], "unknown task 'digit'"),
    (["train", "--device", "tcp://127.0.0.1", "--steps", "1"], "needs a host and a port"),
])
def test_cli_mistakes_are_one_line(argv: list[str], needle: str, tmp_path) -> None:
    # run in tmp_path: whatever a command writes by default lands there
    proc = subprocess.run([sys.executable, "-m", "host.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://localhost", "tcp://:5555", "tcp://host:port"])
def test_connect_refuses_an_address_without_host_and_port(address: str) -> None:
    with pytest.raises(InvalidInputError, match="needs a host and a port"):
        host.connect(address)
