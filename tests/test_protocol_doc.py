"""docs/protocol.md is the contract: it must name exactly what the code implements."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import ErrorCode
from protocol.messages import (
    ARRAY_FIELDS,
    OPS,
    PROTOCOL_VERSION,
    REPLY_FIELDS,
    REQUEST_FIELDS,
    WIRE_DTYPES,
    Limits,
    Op,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def _section(title_pattern: str, level: str = "##") -> str:
    """Text from a heading matching ``title_pattern`` to the next heading of the same or higher level."""
    m = re.search(rf"^{level} {title_pattern}\s*$", DOC, flags=re.M)
    assert m, f"docs/protocol.md has no heading {level} {title_pattern}"
    rest = DOC[m.end():]
    stop = re.search(rf"^#{{2,{len(level)}}} ", rest, flags=re.M)
    return rest[: stop.start()] if stop else rest


def _table_keys(text: str) -> set[str]:
    """First-column backticked names of the markdown tables in ``text``."""
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_version_matches():
    m = re.search(r"Protocol version: \*\*(\d+)\.(\d+)\*\*", DOC)
    assert m, "the version line is missing"
    assert (int(m.group(1)), int(m.group(2))) == PROTOCOL_VERSION


def test_operations_match():
    documented = set(re.findall(r"^### `([a-z_]+)`\s*$", DOC, flags=re.M))
    assert documented == {op.value for op in Op}


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
def test_every_field_of_an_operation_is_documented(op):
    text = _section(rf"`{op.value}`", "###")
    spec = OPS[op]
    names = set(spec.args) | set(spec.arrays) | set(spec.result) | set(spec.result_arrays)
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"{op.value}: fields not documented in its section: {missing}"


def test_error_codes_match():
    assert _table_keys(_section(r"6\. Error codes")) == {c.value for c in ErrorCode}


def test_header_fields_match():
    framing = _section(r"2\. Framing")
    request = _table_keys(_section(r"Request header", "###"))
    reply = _table_keys(_section(r"Reply header", "###"))
    assert request == set(REQUEST_FIELDS)
    assert reply == set(REPLY_FIELDS)
    assert set(ARRAY_FIELDS) <= _table_keys(framing)
    for dtype in WIRE_DTYPES:
        assert f"`{dtype}`" in framing


def test_limits_match():
    text = _section(r"7\. Limits")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (\S+) \|", text, flags=re.M)}
    defaults = Limits().as_dict()
    assert set(rows) == set(defaults)
    for key, value in defaults.items():
        assert float(rows[key]) == float(value), key
