"""Same profile + seed = the same bits as before the composer redesign (issue 12).

The fixture was recorded by ``tests/bits_cases.py`` on the code before the redesign; every
returned array, diagnostic and calibration summary of every scenario must hash the same today,
except for the cases listed in ``CHANGED_ON_PURPOSE`` (with the reason) and for diagnostics keys
that did not exist when it was recorded (new keys are allowed; old keys keep their values).
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


# Cases whose numbers changed on purpose since the recording, and why. The fixture stays the
# record of the code before the composer redesign; it is never re-recorded for these.
# * spu-8cell*: issue 13's fluctuation-dissipation fix. The RLC board's thermal noise is now
#   sqrt(2 kappa / R) C^-1 dW (it was sqrt(2 kappa) C^-1 dW, R times too much variance), which
#   changes every underdamped transition covariance and hence every number of these cases.
# * */factored/ on the exact path and the TNGD steps on exact profiles: issue 15's cheaper
#   Factored set-up. The Gram path's eigenbasis now comes from a Cholesky of J J^T and one eigh
#   (it was two eighs), so the basis differs at round-off and in the sign of each eigenvector:
#   the same normals map to other, equally distributed numbers, and noiseless results move at
#   round-off (tests/test_factored_setup.py checks the basis against a dense reference to 1e-12).
# * noisy/diagonal/: issue 15's rails by detection. A symmetric drift on a profile with rails
#   now runs exact while the rails are out of reach (thermo_device/rails.py); it was Heun.
# * noisy/ (every form), noisy-capfree/factored/, tngd/embedded:noisy: issue 15's accuracy-bounded
#   step. The noisy profile steps at dt = 0.1 with integrator.variance_tol = 0.005 (it was 0.02):
#   other steps, so other numbers (tests/test_step_accuracy.py checks the bound).
# * ideal-flicker/: issue 15's exact 1/f noise. A symmetric drift with 1/f noise, isotropic
#   and without rails, is propagated exactly with per-mode poles (flicker_exact.py); it was Heun.
# * */nonsym/, ideal-stochastic/dense/, noisy-capfree/dense/ and noisy-capfree/calibrated/ (every
#   non-symmetric realised drift on the exact path): issue 15's general exact set-up. It samples
#   in the real eigenbasis of F (thermo_device/general_basis.py), drawing the noise through a
#   Cholesky factor of Q in basis coordinates instead of an eigen square root of Q: the same law,
#   other numbers (tests/test_general_exact.py checks it against Van Loan and the exact law).
CHANGED_ON_PURPOSE = ("ideal/nonsym/", "ideal-stochastic/nonsym/", "ideal-stochastic/dense/", "tngd-paper/nonsym/",
                      "noisy-capfree/dense/", "noisy-capfree/nonsym/", "noisy-capfree/calibrated/",
                      "ideal-flicker/", "noisy/", "noisy-capfree/factored/", "tngd/embedded:noisy", "spu-8cell/", "spu-8cell-baoab/", "spu-8cell-em/", "ideal/factored/",
                      "ideal-stochastic/factored/", "tngd-paper/factored/", "tngd/embedded:ideal",
                      "tngd/embedded:tngd-paper")
# Diagnostics keys added after the recording are allowed (a run may report more than it did);
# every key the recording has must still be there with its value. Added so far: issue 13's
# "stability_margin" and "unstable".
_DIAGNOSTICS = "/diagnostics/"


def _compared(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not k.startswith(CHANGED_ON_PURPOSE)}


def test_every_profile_gives_the_recorded_bits():
    expected = _compared(dict(_flatten(json.loads(FIXTURE.read_text()))))
    got = _compared(dict(_flatten(record())))
    missing = sorted(set(expected) - set(got))
    extra = sorted(k for k in set(got) - set(expected) if _DIAGNOSTICS not in k)
    changed = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    assert not missing and not extra and not changed, (
        f"missing {missing[:10]}, new {extra[:10]}, changed {len(changed)}: "
        + "; ".join(f"{k}: {expected[k]} -> {got[k]}" for k in changed[:10]))
