"""The largest threshold a multiple-comparison family can apply, and which pairs need exact p-values.

Below the scan (:mod:`neuroprobe.analysis.scan` decides the exact-p cut-off of each site with
:func:`exact_cutoff`) and below the criterion (:mod:`neuroprobe.analysis.criterion`, which
applies the families and re-exports these names).
"""
from __future__ import annotations

from neuroprobe.analysis.exact import EXACT_MARGIN
from neuroprobe.errors import NeuroprobeError

FAMILIES = ("units", "pairs")


def largest_threshold(fdr: float, n_tests: int, family: str = "units") -> float:
    """The largest screening p-value at which a unit x concept test can ever be significant.

    ``pairs``: BH's last step, when every test of the recording is significant: ``fdr``.
    ``units``: a unit is selected only when ``C min_c p <= fdr`` (BH over units never allows
    more) and a concept is significant only when ``C p <= fdr R / M <= fdr``: ``fdr / C``, with
    ``C = n_tests`` the unit's concept tests.  BY only divides these by a harmonic number, so
    the bound holds for both methods.  With two concepts it is 0.025 (``units``) and 0.05
    (``pairs``) at ``fdr = 0.05``.

    Parameters
    ----------
    fdr
        FDR level.
    n_tests
        Concept tests of a unit (concepts with stimuli both in and outside the concept).
    family
        ``units`` or ``pairs``.
    """
    if family not in FAMILIES:
        raise NeuroprobeError(f"FDR family {family!r} is not one of {', '.join(FAMILIES)}.")
    return float(fdr) if family == "pairs" or n_tests < 1 else float(fdr) / int(n_tests)


def exact_cutoff(fdr: float, n_tests: int, family: str = "units") -> float:
    """The asymptotic p at or below which a screening pair gets its exact p-value.

    The rule: ``max(largest_threshold(fdr, n_tests, family), EXACT_MARGIN)``.

    * It reaches :func:`largest_threshold`, the largest threshold any step of the family can
      apply: every pair whose normal-approximation p could be declared significant is tested
      on its exact p (which can be far larger: a mostly silent unit with asymptotic p 0.015
      has exact p 0.035), so no pair is significant on the approximation alone.  A pair above
      the cut-off keeps an asymptotic p above every threshold: it is never significant.
    * :data:`~neuroprobe.analysis.exact.EXACT_MARGIN` (0.01) is a floor: it keeps the p-values
      of earlier releases (exact at or below 0.01) identical, and it gives exact p-values to
      pairs the approximation makes *less* significant than they are (heavily tied units: exact
      0.012 with asymptotic 0.073 in a random search of small batteries).  The guarantee above
      does not need the floor.  Lowering it (down to the bound itself) skips only pairs that
      cannot be significant on their asymptotic p, and changes their ``p``, ``p_test`` and
      ``concept``; a verdict changes only where that asymptotic p is larger than the exact one:
      a discovery lost, never a false one gained.

    Parameters
    ----------
    fdr, n_tests, family
        As for :func:`largest_threshold`.
    """
    return max(largest_threshold(fdr, n_tests, family), EXACT_MARGIN)
