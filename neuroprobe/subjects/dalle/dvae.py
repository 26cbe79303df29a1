"""OpenAI's DALL·E discrete VAE as an image tokenizer (8192 codes on a 32 x 32 grid).

OpenAI released only this dVAE (``encoder.pkl``, ``decoder.pkl``), not the DALL·E
transformer.  The files are whole pickled modules (classes from the ``dall_e``
package), so loading them runs code from the file: :func:`load_dvae` refuses unless
the caller opts in with ``trust_pickle=True`` (``--trust-pickle`` on the command line).

Note that dVAE codes are **not** the codes min-dalle's decoder predicts (VQGAN,
16384 codes on 16 x 16): they cannot be scored by the DALL·E Mini/Mega subject.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError

#: openai/DALL-E's ``logit_laplace_eps``.
LOGIT_LAPLACE_EPS = 0.1
#: The dVAE's input size.
DVAE_IMAGE_SIZE = 256


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Squeeze pixels in [0, 1] into [eps, 1 - eps] (openai/DALL-E ``map_pixels``)."""
    return (1 - 2 * eps) * x + eps


def preprocess_image(image, size: int = DVAE_IMAGE_SIZE) -> torch.Tensor:
    """PIL image -> ``[1, 3, size, size]`` dVAE input.

    As in openai/DALL-E's usage notebook: resize (Lanczos) so the shorter side is
    ``size``, centre-crop to ``size`` x ``size``, scale to [0, 1], then :func:`map_pixels`.
    Unlike the notebook, smaller images are upscaled instead of rejected.
    """
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    r = size / min(w, h)
    nw, nh = max(size, round(w * r)), max(size, round(h * r))
    image = image.resize((nw, nh), Image.LANCZOS)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    return map_pixels(x)


def load_dvae(path: str | Path, trust_pickle: bool = False, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a pickled dVAE module (``encoder.pkl`` or ``decoder.pkl``).

    Parameters
    ----------
    path
        The ``.pkl`` file from openai/DALL-E.
    trust_pickle
        Must be ``True``: unpickling a module can run arbitrary code.
    device
        Where to map the module.

    Returns
    -------
    torch.nn.Module
        The module, in eval mode.
    """
    if not trust_pickle:
        raise NeuroprobeError(
            f"{path} is a pickled module whose loading can run arbitrary code; pass --trust-pickle "
            f"(trust_pickle=True) only if you trust where the file came from."
        )
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"dVAE file {path} not found; download encoder.pkl from https://cdn.openai.com/dall-e/encoder.pkl and give its path."
        )
    try:
        module = torch.load(path, map_location=device, weights_only=False)
    except ModuleNotFoundError as err:
        raise NeuroprobeError(
            f"{path} needs the {err.name!r} package to unpickle; install openai's dVAE code with `pip install --no-deps DALL-E attrs`."
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise NeuroprobeError(f"{path} does not hold a pickled torch module; give openai/DALL-E's encoder.pkl.")
    return module.eval()


@torch.no_grad()
def encode_image_dvae(dvae_encoder: torch.nn.Module, image) -> torch.Tensor:
    """dVAE tokens of one image: argmax of the encoder's logits over the 32 x 32 grid.

    Parameters
    ----------
    dvae_encoder
        The module from :func:`load_dvae` (maps ``[B, 3, 256, 256]`` to logits ``[B, codes, 32, 32]``).
    image
        A PIL image, or an already preprocessed tensor ``[1, 3, 256, 256]``.

    Returns
    -------
    torch.Tensor
        Long tensor ``[32 * 32]`` of codes, row-major over the grid.
    """
    if isinstance(image, torch.Tensor):
        x = image
    else:
        x = preprocess_image(image)
    param = next(dvae_encoder.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    logits = dvae_encoder(x)
    return logits.argmax(dim=1).reshape(-1).cpu()
