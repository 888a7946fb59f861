"""docs/protocol.md is the contract: it must name exactly what the code implements."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import CLIENT_SIDE_CODES, SEQ_FREE_CODES, ErrorCode
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


def _table_rows(text: str) -> dict[str, list[str]]:
    """First-column backticked name -> the other cells, for the markdown tables in ``text``."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_seq_rule_matches_for_every_code():
    """Section 6's seq column is SEQ_FREE_CODES (free), CLIENT_SIDE_CODES (client), the rest used;
    section 5 names the free codes in its rule too."""
    rows = _table_rows(_section(r"6\. Error codes"))
    column = {code: cells[0] for code, cells in rows.items()}
    want = {c.value: ("free" if c in SEQ_FREE_CODES else "client" if c in CLIENT_SIDE_CODES else "used")
            for c in ErrorCode}
    assert column == want
    rule = _section(r"5\. Sessions, sequence numbers and restarts")
    for code in SEQ_FREE_CODES:
        assert f"`{code.value}`" in rule


def _info_tables() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    text = _section(r"`info`", "###")
    split = text.index("`capabilities` is the plain-data form")
    return _table_rows(text[:split]), _table_rows(text[split:])


def test_info_keys_match_the_emulator_for_every_profile():
    from thermo_device import Emulator, load_profile

    info_rows, _ = _info_tables()
    for name in ("ideal", "tngd-paper", "spu-8cell", "noisy"):
        info = Emulator(load_profile(name), seed=1).info()
        assert set(info) == set(info_rows), name
        for key, value in info.items():
            if isinstance(value, dict) and key != "capabilities":  # nested maps: every key spelled
                for sub in value:
                    assert f"`{sub}`" in info_rows[key][-1], f"info.{key}.{sub} is not documented"
    # every backend sends the keys marked *all*: the Backend default info()
    from thermo_device.backend import Backend

    class Minimal(Backend):  # only the abstract members: info() is the default one
        def capabilities(self):
            return Emulator(load_profile("ideal")).capabilities()

        program = run = None  # type: ignore[assignment]
        state = property(lambda self: None)

    Minimal.__abstractmethods__ = frozenset()
    marked = {k for k, cells in info_rows.items() if "*all*" in cells[-1]}
    assert marked == set(Minimal().info())


def test_info_units_and_types_are_given():
    info_rows, caps_rows = _info_tables()
    for rows in (info_rows, caps_rows):
        for key, (typ, _unit, meaning) in rows.items():
            assert typ and meaning, key
    assert info_rows["tau_s"][1] == "s" and info_rows["kappa"][1] == "(full-scale units)^2"
    assert info_rows["max_duration"][1] == "tau" and caps_rows["sample_interval"][1] == "tau"


def test_capabilities_keys_match():
    from dataclasses import fields

    from protocol.capabilities import Capabilities

    _, caps_rows = _info_tables()
    assert set(caps_rows) == {f.name for f in fields(Capabilities)}


def test_example_carries_the_current_version():
    example = _section(r"10\. Example")
    versions = re.findall(r'"version": \[(\d+), (\d+)\]', example)
    assert versions and all((int(a), int(b)) == PROTOCOL_VERSION for a, b in versions)


def test_changelog_names_the_current_version():
    changes = _section(r"11\. Changes")
    assert f"**{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}**" in changes
