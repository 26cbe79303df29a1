"""Sparse autoencoders: load (SAELens, sparsify), train on a recorded site, and use their features as units."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "SparseAutoencoder": "neuroprobe.sae.model",
    "load_sae": "neuroprobe.sae.io",
    "save_sae": "neuroprobe.sae.io",
    "sae_format": "neuroprobe.sae.io",
    "TrainConfig": "neuroprobe.sae.train",
    "train_sae": "neuroprobe.sae.train",
    "write_result": "neuroprobe.sae.train",
    "attach": "neuroprobe.sae.sites",
    "feature_site": "neuroprobe.sae.sites",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["SparseAutoencoder", "TrainConfig", "attach", "feature_site", "load_sae", "sae_format", "save_sae", "train_sae",
           "write_result"]
