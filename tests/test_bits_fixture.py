"""Same profile + seed = the same bits as before the composer redesign (issue 12).

The fixture was recorded by ``tests/bits_cases.py`` on the code before the redesign; every
returned array, diagnostic and calibration summary of every scenario must hash the same today.
A change that moves the random stream on purpose re-records the fixture and says so.
"""

from __future__ import annotations

import json
import re

from tests.bits_cases import FIXTURE, record

# A diagnostic that was a NumPy scalar and is now a Python number of the same value (the
# recording used repr) is the same number.
_NUMPY_SCALAR = re.compile(r"^np\.(?:float64|int64)\((.*)\)$")


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", _NUMPY_SCALAR.sub(r"\1", v) if isinstance(v, str) else v


def test_every_profile_gives_the_recorded_bits():
    expected = dict(_flatten(json.loads(FIXTURE.read_text())))
    got = dict(_flatten(record()))
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    assert not missing and not extra and not changed, (
        f"missing {missing[:10]}, new {extra[:10]}, changed {len(changed)}: "
        + "; ".join(f"{k}: {expected[k]} -> {got[k]}" for k in changed[:10]))
