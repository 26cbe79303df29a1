"""Lesions: silence, replace or scale units through electrodes, and measure what the subject forgets."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "LesionStudy": "neuroprobe.lesions.forgetting",
    "integrated_gradients": "neuroprobe.lesions.attribution",
    "knowledge_neurons": "neuroprobe.lesions.attribution",
    "dose_response": "neuroprobe.lesions.forgetting",
    "forgetting": "neuroprobe.lesions.forgetting",
    "forgetting_matrix": "neuroprobe.lesions.forgetting",
    "importance_summary": "neuroprobe.lesions.forgetting",
    "selectivity_vs_importance": "neuroprobe.lesions.forgetting",
    "summarize": "neuroprobe.lesions.forgetting",
    "MODES": "neuroprobe.lesions.lesion",
    "Lesion": "neuroprobe.lesions.lesion",
    "lesion": "neuroprobe.lesions.lesion",
    "normalize_units": "neuroprobe.lesions.lesion",
    "reference_responses": "neuroprobe.lesions.lesion",
    "site_responses": "neuroprobe.lesions.lesion",
    "cells_ranking": "neuroprobe.lesions.ranking",
    "dprime": "neuroprobe.lesions.ranking",
    "rank_responses": "neuroprobe.lesions.ranking",
    "rank_units": "neuroprobe.lesions.ranking",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Lesion", "integrated_gradients", "knowledge_neurons", "LesionStudy", "MODES", "cells_ranking", "dose_response", "dprime", "forgetting", "forgetting_matrix", "importance_summary", "lesion", "normalize_units", "rank_responses", "rank_units", "reference_responses", "selectivity_vs_importance", "site_responses", "summarize"]
