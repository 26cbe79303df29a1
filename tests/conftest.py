"""Shared pytest fixtures (generic: usable by every test file)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

torch.set_num_threads(1)  # the test machine is small and shared


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_dir(arch, seed=0) -> Path``: a tiny saved transformers model, built once per session.

    See :func:`neuroprobe.testing.make_tiny` for the architectures; load the folder with
    ``load_subject(neuroprobe.testing.SUBJECT_FOR_ARCH[arch], weights=folder)``.
    """
    from neuroprobe.testing import make_tiny

    built: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in built:
            built[key] = make_tiny(arch, root / f"{arch}-seed{seed}", seed=seed)
        return built[key]

    return get
