"""Lesions: silence, replace or scale units through electrodes, and measure what the subject forgets."""
from neuroprobe.lesions.forgetting import (
    LesionStudy,
    dose_response,
    forgetting,
    forgetting_matrix,
    importance_summary,
    selectivity_vs_importance,
    summarize,
)
from neuroprobe.lesions.lesion import MODES, Lesion, lesion, normalize_units, reference_responses, site_responses
from neuroprobe.lesions.ranking import cells_ranking, dprime, rank_responses, rank_units

__all__ = [
    "MODES", "Lesion", "LesionStudy", "cells_ranking", "dose_response", "dprime", "forgetting", "forgetting_matrix",
    "importance_summary", "lesion", "normalize_units", "rank_responses", "rank_units", "reference_responses",
    "selectivity_vs_importance", "site_responses", "summarize",
]
