"""OpenAI's DALL·E discrete VAE as an image tokenizer (8192 codes on a 32 x 32 grid).

OpenAI released only this dVAE (``encoder.pkl``, ``decoder.pkl``), not the DALL·E
transformer.  The files are whole pickled modules (classes from the ``dall_e``
package).  :class:`DVAEEncoder` is the encoder written in plain torch after
openai/DALL-E's ``dall_e/encoder.py`` (same parameter names: ``blocks.group_1.block_1.res_path.conv_1.w``),
and :func:`load_dvae_encoder` fills it from ``encoder.pkl`` *without running the pickle*
(:mod:`neuroprobe.subjects.archive` reads the tensors of a torch zip archive with a restricted
unpickler); only a file that reader cannot take (the pre-1.6 torch format) needs
``trust_pickle=True`` (``--trust-pickle``), which unpickles it fully (that runs code from the
file and needs the ``dall_e`` package).  :func:`load_dvae` loads any pickled module that way.

Note that dVAE codes are **not** the codes min-dalle's decoder predicts (VQGAN,
16384 codes on 16 x 16): they cannot be scored by the DALL·E Mini/Mega subject.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


# ====================================================================== the encoder, ported


class _Conv(nn.Module):
    """``dall_e.utils.Conv2d``: weight ``w``, bias ``b``, same padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _Block(nn.Module):
    """Identity (or 1x1) path plus ``post_gain`` times four ReLU-conv layers (3x3, 3x3, 3x3, 1x1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential()
        for k, (a, b, kw) in enumerate([(n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1)], start=1):
            self.res_path.add_module(f"relu_{k}", nn.ReLU())
            self.res_path.add_module(f"conv_{k}", _Conv(a, b, kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """OpenAI's dVAE encoder: ``[B, 3, H, W]`` (``map_pixels``'d) -> logits ``[B, vocab, H/8, W/8]``.

    Parameters
    ----------
    n_hid, n_blk_per_group, vocab_size
        The released encoder has 256, 2, 8192 (``dall_e.encoder.Encoder`` defaults).
    """

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
        n_layers = 4 * n_blk_per_group
        self.blocks = nn.Sequential()
        self.blocks.add_module("input", _Conv(3, n_hid, 7))
        width = n_hid
        for g, mult in enumerate((1, 2, 4, 8), start=1):
            group = nn.Sequential()
            for i in range(n_blk_per_group):
                group.add_module(f"block_{i + 1}", _Block(width, mult * n_hid, n_layers))
                width = mult * n_hid
            if g < 4:
                group.add_module("pool", nn.MaxPool2d(kernel_size=2))
            self.blocks.add_module(f"group_{g}", group)
        output = nn.Sequential()
        output.add_module("relu", nn.ReLU())
        output.add_module("conv", _Conv(8 * n_hid, vocab_size, 1))
        self.blocks.add_module("output", output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.float())

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "the file") -> "DVAEEncoder":
        """Build the shape ``state`` describes and load it strictly (a mismatch names the keys)."""
        try:
            n_hid = int(state["blocks.input.w"].shape[0])
            vocab = int(state["blocks.output.conv.w"].shape[0])
        except KeyError as err:
            raise NeuroprobeError(f"{source} is not OpenAI's dVAE encoder (it has no {err.args[0]!r}).") from None
        blocks = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
        with torch.device("meta"):
            model = cls(n_hid, max(blocks, 1), vocab)
        want = model.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
        if missing or unexpected or shapes:
            raise NeuroprobeError(
                f"{source} does not match openai/DALL-E's encoder layout: missing {', '.join(missing[:8]) or 'none'}; "
                f"unexpected {', '.join(unexpected[:8]) or 'none'}; wrong shape {', '.join(shapes[:8]) or 'none'}."
            )
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return model.eval()


def load_dvae_encoder(path: str | Path, *, trust_pickle: bool = False, device: str | torch.device = "cpu") -> DVAEEncoder:
    """OpenAI's ``encoder.pkl`` as a :class:`DVAEEncoder`, read without running the pickle when possible.

    Raises
    ------
    MissingWeightsError
        When the file is not there.
    NeuroprobeError
        When the safe reader cannot take the file and ``trust_pickle`` is off, or the layout differs.
    """
    import pickle
    import zipfile

    from neuroprobe.subjects.archive import module_state_dict, read_module_tree

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"dVAE file {path} not found; download encoder.pkl from https://cdn.openai.com/dall-e/encoder.pkl and give its path."
        )
    try:
        state = module_state_dict(read_module_tree(path))
    except (zipfile.BadZipFile, pickle.UnpicklingError) as err:
        if not trust_pickle:
            raise NeuroprobeError(
                f"{path} cannot be read without unpickling it ({err}); pass --trust-pickle (trust_pickle=True) "
                f"only if you trust where the file came from."
            ) from None
        state = load_dvae(path, trust_pickle=True).state_dict()
    return DVAEEncoder.from_state_dict(state, str(path)).to(device)
